package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/lab/sandbox"
)

// The workload: convServices Services (KNIT_BENCH_CONV_SERVICES
// overrides), created one at a time, each selecting the same two ready
// echo pods; a Service is measured until every node reaches it, then the
// next one is created convGap later.
const (
	convServices  = 30
	convNS        = "conv-bench"
	convDial      = 200 * time.Millisecond // one connection attempt
	convInterval  = 2 * time.Millisecond   // between attempts
	convGiveUp    = 15 * time.Second
	convGap       = time.Second // between one Service reached and the next created
	convTargetP99 = time.Second // DESIGN.md: Service created -> reachable from every node, p99
)

// BenchmarkConvergence measures DESIGN.md's convergence target, "Service
// created -> reachable from every node, p99 <= 1 s", for knit's proxy and
// for kube-proxy v1.37.2 (nftables mode) in the same lab and run:
//
//	netns node1, node2: knit agent (cni, overlay, proxy)
//	netns node3, node4: knit agent (cni, overlay) + kube-proxy --proxy-mode=nftables
//	echo pods on node1 and node3, label app=conv
//
// Each Service is a ClusterIP Service selecting the echo pods. Time 0 is
// just before the Create call. From each node's netns a prober opens a new
// TCP connection to ClusterIP:80 every 2 ms (each given 200 ms, so they
// overlap) until one is answered; that moment is the node's time. The path it
// measures is the whole one an operator sees: the API server, the
// EndpointSlice controller writing the slice, the node's proxy seeing
// Service and slice and programming the kernel, and a connection through
// the overlay to a pod that may be on another node. The EndpointSlice
// controller's part is the same for both proxies.
//
//	go test -run '^$' -bench BenchmarkConvergence -benchtime 1x ./bench/
func BenchmarkConvergence(b *testing.B) {
	sandbox.Require(b)
	ctx := context.Background()
	services := convServices
	if v := os.Getenv("KNIT_BENCH_CONV_SERVICES"); v != "" {
		if _, err := fmt.Sscan(v, &services); err != nil || services < 1 {
			b.Fatalf("KNIT_BENCH_CONV_SERVICES=%q: want a positive number", v)
		}
	}
	cl, cpBin, dir := benchLab(ctx, b, "convergence", lab.Options{Nodes: 4, Components: "cni,overlay,proxy"})
	defer cl.Down()
	n1, n2, n3, n4 := cl.Nodes[0], cl.Nodes[1], cl.Nodes[2], cl.Nodes[3]

	// node3 and node4: knit without its proxy, kube-proxy instead.
	for _, n := range []*lab.Node{n3, n4} {
		n.StopAgent()
		if err := n.StartAgentWith("--components=cni,overlay"); err != nil {
			b.Fatal(err)
		}
		if err := n.WaitAgentReady(ctx, time.Minute); err != nil {
			b.Fatal(err)
		}
		// The proxy table the stopped agent left (an agent never tears
		// its data plane down) would answer for Services it no longer
		// follows.
		_, _ = n.Exec(ctx, "nft", "delete", "table", "inet", "knit-proxy")
		kp, err := proxyKubeProxy(cpBin, cl, n, "nftables")
		if err != nil {
			b.Fatal(err)
		}
		defer proxyStop(kp)
	}

	if err := cl.EnsureNamespace(ctx, convNS); err != nil {
		b.Fatal(err)
	}
	labels := map[string]string{"app": "conv"}
	for _, p := range []struct{ name, node string }{{"conv-a", n1.Name}, {"conv-b", n3.Name}} {
		if _, err := cl.Client.CoreV1().Pods(convNS).Create(ctx, lab.EchoPod(convNS, p.name, p.node, labels), metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := cl.WaitPodRunning(ctx, convNS, p.name, true, 90*time.Second); err != nil {
			b.Fatal(err)
		}
	}
	// kube-proxy must have synced once (the kubernetes Service) before
	// the first Service is timed.
	for _, n := range []*lab.Node{n3, n4} {
		if err := convWaitKubeProxy(ctx, n); err != nil {
			b.Fatal(err)
		}
	}

	client := writerClient(b, cl)
	sliceTimes := convWatchSlices(ctx, b, cl)
	sides := []struct {
		name  string
		nodes []*lab.Node
	}{{"knit", []*lab.Node{n1, n2}}, {"kube-proxy nftables", []*lab.Node{n3, n4}}}
	times := map[string][]time.Duration{}
	var missed []string
	b.ResetTimer()
	for i := range services {
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("conv-%d", i), Namespace: convNS},
			Spec: corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{
				Name: "http", Port: 80, TargetPort: intstr.FromInt32(echo.HTTPPort), Protocol: corev1.ProtocolTCP}}},
		}
		start := time.Now()
		sliceTimes.expect(svc.Name, start)
		created, err := client.CoreV1().Services(convNS).Create(ctx, svc, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		addr := net.JoinHostPort(created.Spec.ClusterIP, "80")
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, s := range sides {
			for _, n := range s.nodes {
				wg.Go(func() {
					d, err := convProbe(n, addr, start)
					mu.Lock()
					defer mu.Unlock()
					if err != nil {
						missed = append(missed, fmt.Sprintf("%s %s: %v", svc.Name, n.Name, err))
						return
					}
					times[s.name] = append(times[s.name], d)
				})
			}
		}
		wg.Wait()
		// kube-proxy syncs at most once a second (--min-sync-period's
		// default): a second between Services lets it show its best.
		time.Sleep(convGap)
	}
	b.StopTimer()

	var out strings.Builder
	fmt.Fprintf(&out, "\nBenchmarkConvergence: %s\n", overlayMachine())
	fmt.Fprintf(&out, "%d ClusterIP Services created one at a time; time from the Create call until a TCP connection from the node's netns to ClusterIP:80 is answered (a new attempt every %v, each given %v)\n\n",
		services, convInterval, convDial)
	tw := tabwriter.NewWriter(&out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "proxy\tnodes\tsamples\tp50\tp90\tp99\tmax\t")
	p99 := map[string]time.Duration{}
	for _, s := range sides {
		d := times[s.name]
		slices.Sort(d)
		if len(d) == 0 {
			fmt.Fprintf(tw, "%s\t%d\t0\t\t\t\t\t\n", s.name, len(s.nodes))
			continue
		}
		p99[s.name] = proxyPct(d, 0.99)
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t\n", s.name, len(s.nodes), len(d),
			proxyMS(proxyPct(d, 0.50)), proxyMS(proxyPct(d, 0.90)), proxyMS(p99[s.name]), proxyMS(d[len(d)-1]))
	}
	if d := sliceTimes.times(); len(d) > 0 {
		fmt.Fprintf(tw, "(EndpointSlice with ready endpoints seen by a watch)\t\t%d\t%s\t%s\t%s\t%s\t\n", len(d),
			proxyMS(proxyPct(d, 0.50)), proxyMS(proxyPct(d, 0.90)), proxyMS(proxyPct(d, 0.99)), proxyMS(d[len(d)-1]))
	}
	tw.Flush()
	for _, m := range missed {
		fmt.Fprintf(&out, "not reached: %s\n", m)
	}
	fmt.Fprintf(&out, "\nknit p99 %s (target <= %v): %s; kube-proxy nftables p99 / knit p99 = %s\n",
		proxyMS(p99["knit"]), convTargetP99, overlayVerdict(len(missed) == 0 && p99["knit"] > 0 && p99["knit"] <= convTargetP99),
		proxyRatio(float64(p99["knit"]), float64(p99["kube-proxy nftables"])))
	fmt.Print(out.String())
	if err := os.WriteFile(filepath.Join(dir, "results.txt"), []byte(out.String()), 0o644); err != nil {
		b.Log(err)
	}
	b.ReportMetric(float64(p99["knit"].Milliseconds()), "knit-p99-ms")
	b.ReportMetric(float64(p99["kube-proxy nftables"].Milliseconds()), "kube-proxy-p99-ms")
}

// convSlices times, per Service, when a watch first sees an EndpointSlice
// of it with a ready endpoint: the control plane's share of the time.
type convSlices struct {
	mu    sync.Mutex
	start map[string]time.Time
	took  map[string]time.Duration
}

func convWatchSlices(ctx context.Context, b *testing.B, cl *lab.Cluster) *convSlices {
	b.Helper()
	w, err := cl.Client.DiscoveryV1().EndpointSlices(convNS).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(w.Stop)
	c := &convSlices{start: map[string]time.Time{}, took: map[string]time.Duration{}}
	go func() {
		for ev := range w.ResultChan() {
			es, ok := ev.Object.(*discoveryv1.EndpointSlice)
			if !ok {
				continue
			}
			ready := slices.ContainsFunc(es.Endpoints, func(e discoveryv1.Endpoint) bool {
				return e.Conditions.Ready != nil && *e.Conditions.Ready
			})
			if !ready {
				continue
			}
			name := es.Labels[discoveryv1.LabelServiceName]
			c.mu.Lock()
			if start, ok := c.start[name]; ok {
				if _, seen := c.took[name]; !seen {
					c.took[name] = time.Since(start)
				}
			}
			c.mu.Unlock()
		}
	}()
	return c
}

func (c *convSlices) expect(service string, start time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.start[service] = start
}

func (c *convSlices) times() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	var d []time.Duration
	for _, t := range c.took {
		d = append(d, t)
	}
	slices.Sort(d)
	return d
}

// convProbe opens a new non-blocking TCP connection to addr from node n's
// netns every convInterval, each given convDial, until one is answered,
// and returns the time from start to that answer. The attempts overlap,
// so a SYN that went nowhere before the Service was programmed does not
// hide a later one that gets through (sequential attempts would measure
// in steps of the attempt timeout).
func convProbe(n *lab.Node, addr string, start time.Time) (time.Duration, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return 0, err
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	netns, err := ns.GetNS(n.Netns())
	if err != nil {
		return 0, err
	}
	defer netns.Close()
	var took time.Duration
	err = netns.Do(func(ns.NetNS) error { // one locked thread in the node's netns
		type attempt struct {
			fd    int
			since time.Time
		}
		var open []attempt
		defer func() {
			for _, a := range open {
				unix.Close(a.fd)
			}
		}()
		var last error
		for time.Since(start) < convGiveUp {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
				last = err
				unix.Close(fd)
			} else {
				open = append(open, attempt{fd, time.Now()})
			}
			pfds := make([]unix.PollFd, len(open))
			for i, a := range open {
				pfds[i] = unix.PollFd{Fd: int32(a.fd), Events: unix.POLLOUT}
			}
			if _, err := unix.Poll(pfds, int(convInterval.Milliseconds())); err != nil && err != unix.EINTR {
				return err
			}
			kept := open[:0]
			for i, a := range open {
				if pfds[i].Revents != 0 {
					soErr, err := unix.GetsockoptInt(a.fd, unix.SOL_SOCKET, unix.SO_ERROR)
					if err == nil && soErr == 0 {
						took = time.Since(start)
						return nil
					}
					last = unix.Errno(soErr)
					unix.Close(a.fd)
					continue
				}
				if time.Since(a.since) > convDial {
					last = fmt.Errorf("no answer within %v", convDial)
					unix.Close(a.fd)
					continue
				}
				kept = append(kept, a)
			}
			open = kept
		}
		return fmt.Errorf("not answered within %v: %v", convGiveUp, last)
	})
	return took, err
}

// convWaitKubeProxy waits until kube-proxy on node n has programmed the
// kubernetes Service.
func convWaitKubeProxy(ctx context.Context, n *lab.Node) error {
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := n.Exec(ctx, "nft", "list", "map", "ip", "kube-proxy", "service-ips")
		if err == nil && strings.Contains(out, "10.43.0.1 . tcp . 443") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: kube-proxy has not programmed the kubernetes Service: %v %s", n.Name, err, out)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
