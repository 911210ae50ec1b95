package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/containernetworking/plugins/pkg/ns"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/sandbox"
)

// The workload (issue 5): proxyServices Services of one TCP port, each with
// an EndpointSlice of proxyEndpoints ready endpoints written by the
// benchmark itself, then proxyAdded single Services added one at a time.
const (
	proxyServices  = 10000
	proxyEndpoints = 10
	proxyWriters   = 32
	proxyAdded     = 10
	proxyNamespace = "proxy-bench"
	proxyManagedBy = "knit-bench" // not the endpointslice controller's, which leaves the slices alone
)

// Limits: how long a proxy may take to program the Services before the
// run gives up on it, and the cap on the iptables anchor (its first sync
// alone takes over 10 minutes at this scale).
const (
	proxyProgramTimeout  = 8 * time.Minute
	proxyIptablesTimeout = 3 * time.Minute
	proxyAddTimeout      = 10 * time.Second
	proxyTargetAdd       = 50 * time.Millisecond
)

// First-packet latency (issue 5, part 3): proxyLatServices Services whose
// one endpoint is a listener in the sandbox root (the underlay bridge's
// address, outside both proxies' nodes), dialled proxyLatDials times from
// each proxy's node netns with 10 and with 10,000 Services programmed.
const (
	proxyLatServices = 10
	proxyLatPort     = 18080
	proxyLatDials    = 2000
	proxyLatBatch    = 100 // dials per side before switching sides
	proxyLatTarget   = 1.2 // p99 at 10,000 Services / p99 at 10
)

// proxySide is one proxy under test, in its own node netns.
type proxySide struct {
	name    string
	node    *lab.Node
	metrics string                             // metrics URL
	count   func(context.Context) (int, error) // Services programmed
	pid     func() int
	fullSum string // metric names of the full and partial sync histograms
	partSum string

	started    time.Time
	programmed time.Duration // 0: not within its limit
	firstSync  string
	rss        int64 // KiB, after the first full sync
	rssEnd     int64
	added      []time.Duration
	lat10      []time.Duration // first-packet (TCP connect) latency, 10 Services
	lat10k     []time.Duration // the same with 10,000 more
	partial    string
	cmd        *exec.Cmd
}

// BenchmarkProxy compares knit's service proxy with kube-proxy v1.37.2 at
// 10,000 Services x 10 endpoints, side by side in one lab run:
//
//	sandbox root: control plane (lab/cp) on 198.18.0.254
//	  netns node1: knit agent --components=proxy      (table inet knit-proxy)
//	  netns node2: kube-proxy --proxy-mode=nftables   (table ip kube-proxy)
//	  netns node3: kube-proxy --proxy-mode=iptables   (afterwards, alone, capped)
//
// First, with only proxyLatServices Services (one endpoint each: a listener
// on the underlay bridge in the sandbox root), both nftables proxies are
// started, and TCP connects from each node netns to those ClusterIPs time
// the first packet of a connection; then both are stopped and their tables
// deleted. The 10,000 Services and their EndpointSlices are written before
// either proxy starts again; knit, then kube-proxy, each started alone, is
// timed from process start until its service-ips map (KUBE-SERVICES chain
// for iptables) holds every Service. The first-packet latency is measured again at that
// scale. Then proxyAdded Services are added one at a time and timed from
// the EndpointSlice write returning until `nft monitor` in each netns shows
// the ClusterIP's service-ips element. First full sync duration comes from
// each proxy's own metric, RSS from /proc. Targets missed are reported, not
// failed.
//
//	go test -run '^$' -bench BenchmarkProxy -benchtime 1x -timeout 60m ./bench/
func BenchmarkProxy(b *testing.B) {
	sandbox.Require(b)
	ctx := context.Background()
	began := time.Now()
	cl, cpBin, dir := benchLab(ctx, b, "proxy", lab.Options{Nodes: 3, Components: "proxy"})
	defer cl.Down()
	n1, n2, n3 := cl.Nodes[0], cl.Nodes[1], cl.Nodes[2]

	knitCount := func(ctx context.Context) (int, error) {
		return proxyMapCount(ctx, n1, "inet", "knit-proxy", "service-ips-v4")
	}
	// What is programmed before the benchmark's Services: kubernetes (and
	// kube-dns, whose Service has no endpoints).
	base := proxyBaseline(ctx, b, cl, n1)
	client := writerClient(b, cl)
	if err := cl.EnsureNamespace(ctx, proxyNamespace); err != nil {
		b.Fatal(err)
	}
	// Part 3 first, at 10 Services: both proxies programmed, first
	// packets timed, then both stopped and their tables deleted so that
	// the 10,000-Service start below is from scratch again.
	stopLn, err := proxyLatencyListener()
	if err != nil {
		b.Fatal(err)
	}
	defer stopLn()
	latIPs, err := proxyCreateLatencyServices(ctx, client)
	if err != nil {
		b.Fatal(err)
	}
	base += proxyLatServices

	knit := &proxySide{name: "knit", node: n1, metrics: n1.HealthURL() + "/metrics", count: knitCount,
		pid: n1.AgentPID, fullSum: `knit_proxy_sync_duration_seconds_%s{kind="full"}`,
		partSum: `knit_proxy_sync_duration_seconds_%s{kind="partial"}`}
	nftKP := &proxySide{name: "kube-proxy nftables", node: n2, metrics: "http://" + n2.IP + ":10249/metrics",
		count: func(ctx context.Context) (int, error) {
			return proxyMapCount(ctx, n2, "ip", "kube-proxy", "service-ips")
		},
		fullSum: `kubeproxy_sync_full_proxy_rules_duration_seconds_%s{ip_family="IPv4"}`,
		partSum: `kubeproxy_sync_partial_proxy_rules_duration_seconds_%s{ip_family="IPv4"}`}
	nftKP.pid = func() int { return nftKP.cmd.Process.Pid }
	if err := n1.StartAgent(); err != nil {
		b.Fatal(err)
	}
	if nftKP.cmd, err = proxyKubeProxy(cpBin, cl, n2, "nftables"); err != nil {
		b.Fatal(err)
	}
	for _, s := range []*proxySide{knit, nftKP} {
		if err := proxyWaitCount(ctx, s, base, 2*time.Minute); err != nil {
			b.Fatal(err)
		}
	}
	if err := proxyMeasureLatency(ctx, []*proxySide{knit, nftKP}, latIPs, func(s *proxySide) *[]time.Duration { return &s.lat10 }); err != nil {
		b.Fatal(err)
	}
	n1.StopAgent()
	proxyStop(nftKP.cmd)
	_, _ = n1.Exec(ctx, "nft", "delete", "table", "inet", "knit-proxy")
	_, _ = n2.Exec(ctx, "nft", "delete", "table", "ip", "kube-proxy")
	_, _ = n2.Exec(ctx, "nft", "delete", "table", "ip6", "kube-proxy")

	b.ResetTimer()
	t0 := time.Now()
	if err := proxyWriteAll(ctx, client, proxyServices); err != nil {
		b.Fatal(err)
	}
	written := time.Since(t0)
	target := base + proxyServices

	// One after the other, each timed from its own process start: on two
	// cores, two first syncs at once each get about half the machine (run
	// together, knit's 1.6 s full sync measured 4.1-4.6 s).
	knit.started = time.Now()
	if err := n1.StartAgent(); err != nil {
		b.Fatal(err)
	}
	knit.waitProgrammed(ctx, b, target, proxyProgramTimeout)
	nftKP.started = time.Now()
	if nftKP.cmd, err = proxyKubeProxy(cpBin, cl, n2, "nftables"); err != nil {
		b.Fatal(err)
	}
	nftKP.waitProgrammed(ctx, b, target, proxyProgramTimeout)
	if knit.programmed == 0 {
		b.Fatalf("knit did not program %d Services within %v (log: %s)", target, proxyProgramTimeout, filepath.Join(n1.Dir, "agent.log"))
	}

	sides := []*proxySide{knit}
	if nftKP.programmed > 0 {
		sides = append(sides, nftKP)
	}
	if err := proxyMeasureLatency(ctx, sides, latIPs, func(s *proxySide) *[]time.Duration { return &s.lat10k }); err != nil {
		b.Fatal(err)
	}

	// One added Service at a time, watched by both.
	before := map[*proxySide][2]float64{}
	for _, s := range sides {
		sum, count := s.histogram(s.partSum)
		before[s] = [2]float64{sum, count}
	}
	var apiWrites []time.Duration
	if err := proxyAddServices(ctx, b, client, sides, &apiWrites); err != nil {
		b.Fatal(err)
	}
	for _, s := range sides {
		sum, count := s.histogram(s.partSum)
		if d := count - before[s][1]; d > 0 {
			s.partial = fmt.Sprintf("%.1f ms (%d syncs)", 1000*(sum-before[s][0])/d, int(d))
		}
		s.rssEnd = proxyRSS(s.pid())
	}
	proxyStop(nftKP.cmd)

	// The iptables anchor, alone and capped.
	ipt := &proxySide{name: "kube-proxy iptables", node: n3, metrics: "http://" + n3.IP + ":10249/metrics",
		count:   func(ctx context.Context) (int, error) { return proxyIptablesCount(ctx, n3) },
		fullSum: `kubeproxy_sync_full_proxy_rules_duration_seconds_%s{ip_family="IPv4"}`}
	ipt.pid = func() int { return ipt.cmd.Process.Pid }
	ipt.started = time.Now()
	if ipt.cmd, err = proxyKubeProxy(cpBin, cl, n3, "iptables"); err != nil {
		b.Fatal(err)
	}
	ipt.waitProgrammed(ctx, b, target+proxyAdded+1, proxyIptablesTimeout)
	ipt.rssEnd = proxyRSS(ipt.pid())
	proxyStop(ipt.cmd)
	b.StopTimer()

	table := proxyReport(knit, nftKP, ipt, written, apiWrites, time.Since(began))
	b.Log(table)
	if err := os.WriteFile(filepath.Join(dir, "results.txt"), []byte(table), 0o644); err != nil {
		b.Error(err)
	}
}

// proxyWriteAll writes n Services and their EndpointSlices with
// proxyWriters concurrent writers. The Services have no selector: the
// endpointslice controller would otherwise write an empty slice of its own
// for each (10,000 writes neither proxy uses, racing the measurement).
func proxyWriteAll(ctx context.Context, client kubernetes.Interface, n int) error {
	return parallel(proxyWriters, n, func(i int) error {
		_, err := proxyCreate(ctx, client, fmt.Sprintf("svc-%05d", i), i)
		return err
	})
}

// proxyCreate writes Service name (port 80) and its slice of proxyEndpoints
// ready endpoints (10.42.x.y:8080) and returns the ClusterIP.
func proxyCreate(ctx context.Context, client kubernetes.Interface, name string, i int) (string, error) {
	svc, err := client.CoreV1().Services(proxyNamespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{
			Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("service %s: %w", name, err)
	}
	eps := make([]discoveryv1.Endpoint, proxyEndpoints)
	for k := range eps {
		j := (i*proxyEndpoints + k) % (254 * 256)
		eps[k] = discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.42.%d.%d", j/254, j%254+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: new(true)},
		}
	}
	_, err = client.DiscoveryV1().EndpointSlices(proxyNamespace).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-bench", Labels: map[string]string{
			discoveryv1.LabelServiceName: name,
			discoveryv1.LabelManagedBy:   proxyManagedBy,
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Name: new(""), Protocol: new(corev1.ProtocolTCP), Port: new(int32(8080))}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("endpointslice %s: %w", name, err)
	}
	return svc.Spec.ClusterIP, nil
}

// proxyLatencyListener accepts and closes TCP connections on the underlay
// bridge's address in the sandbox root: the endpoint of the latency
// Services, one veth hop from each proxy's node.
func proxyLatencyListener() (stop func(), err error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(sandbox.ControlPlaneIP, strconv.Itoa(proxyLatPort)))
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return func() { ln.Close() }, nil
}

// proxyCreateLatencyServices writes the latency Services (port 80, one
// endpoint: the listener) and returns their ClusterIPs.
func proxyCreateLatencyServices(ctx context.Context, client kubernetes.Interface) ([]string, error) {
	var ips []string
	for i := range proxyLatServices {
		name := fmt.Sprintf("lat-%02d", i)
		svc, err := client.CoreV1().Services(proxyNamespace).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{
				Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(proxyLatPort)}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("service %s: %w", name, err)
		}
		_, err = client.DiscoveryV1().EndpointSlices(proxyNamespace).Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name + "-bench", Labels: map[string]string{
				discoveryv1.LabelServiceName: name,
				discoveryv1.LabelManagedBy:   proxyManagedBy,
			}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{
				Addresses:  []string{sandbox.ControlPlaneIP},
				Conditions: discoveryv1.EndpointConditions{Ready: new(true)},
			}},
			Ports: []discoveryv1.EndpointPort{{Name: new(""), Protocol: new(corev1.ProtocolTCP), Port: new(int32(proxyLatPort))}},
		}, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("endpointslice %s: %w", name, err)
		}
		ips = append(ips, svc.Spec.ClusterIP)
	}
	return ips, nil
}

// proxyWaitCount waits until the side has programmed want Services.
func proxyWaitCount(ctx context.Context, s *proxySide, want int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if n, err := s.count(ctx); err == nil && n >= want {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s: %d Services not programmed within %v", s.name, want, limit)
}

// proxyMeasureLatency times proxyLatDials TCP connects per side from the
// side's node netns to the latency Services' ClusterIPs (round robin): the
// connect returns when the SYN-ACK is back, so it times the first packet's
// trip through the proxy's rules (a new conntrack entry, DNAT, masquerade)
// and back. The sides take turns in batches so that both see the same
// machine load. A few uncounted dials first warm ARP and the route.
func proxyMeasureLatency(ctx context.Context, sides []*proxySide, ips []string, into func(*proxySide) *[]time.Duration) error {
	dial := func(s *proxySide, n int, keep bool, from int) error {
		return ns.WithNetNSPath(s.node.Netns(), func(ns.NetNS) error {
			for i := range n {
				addr := net.JoinHostPort(ips[(from+i)%len(ips)], "80")
				t0 := time.Now()
				c, err := net.DialTimeout("tcp", addr, 2*time.Second)
				d := time.Since(t0)
				if err != nil {
					return fmt.Errorf("%s: dial %s: %w", s.name, addr, err)
				}
				_ = c.(*net.TCPConn).SetLinger(0) // RST: no TIME_WAIT pile-up
				c.Close()
				if keep {
					*into(s) = append(*into(s), d)
				}
			}
			return nil
		})
	}
	for _, s := range sides {
		if err := dial(s, 20, false, 0); err != nil {
			return err
		}
	}
	for k := 0; k < proxyLatDials; k += proxyLatBatch {
		for _, s := range sides {
			if err := dial(s, proxyLatBatch, true, k); err != nil {
				return err
			}
		}
	}
	return nil
}

// proxyKubeProxy starts kube-proxy (the control plane build, v1.37.2) in
// the node's netns. nf_conntrack_max cannot be set in a netns, hence
// --conntrack-max-per-core=0.
func proxyKubeProxy(cpBin string, cl *lab.Cluster, n *lab.Node, mode string) (*exec.Cmd, error) {
	logf, err := os.Create(filepath.Join(n.Dir, "kube-proxy-"+mode+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", "netns", "exec", n.Name, cpBin, "kube-proxy",
		"--proxy-mode="+mode,
		"--kubeconfig", cl.Kubeconfig(),
		"--hostname-override", n.Name,
		"--cluster-cidr", lab.ClusterCIDR,
		"--conntrack-max-per-core=0",
		"--metrics-bind-address", n.IP+":10249",
		"--healthz-bind-address", n.IP+":10256",
		"--v=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() { _ = cmd.Wait(); logf.Close() }()
	return cmd, nil
}

func proxyStop(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(time.Second)
	_ = cmd.Process.Kill()
}

// waitProgrammed polls until the side has programmed want Services, then
// reads its first full sync metric and RSS.
func (s *proxySide) waitProgrammed(ctx context.Context, b *testing.B, want int, limit time.Duration) {
	for time.Since(s.started) < limit {
		if n, err := s.count(ctx); err == nil && n >= want {
			s.programmed = time.Since(s.started)
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if s.programmed == 0 {
		b.Logf("%s: did not program %d Services within %v", s.name, want, limit)
		return
	}
	if sum, count := s.histogram(s.fullSum); count > 0 {
		s.firstSync = fmt.Sprintf("%.2f s", sum/count)
		if count > 1 {
			s.firstSync += fmt.Sprintf(" (mean of %d)", int(count))
		}
	}
	s.rss = proxyRSS(s.pid())
}

// histogram reads the _sum and _count of a histogram from the metrics page.
func (s *proxySide) histogram(format string) (sum, count float64) {
	if format == "" {
		return 0, 0
	}
	resp, err := http.Get(s.metrics)
	if err != nil {
		return 0, 0
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	get := func(name string) float64 {
		for line := range strings.Lines(string(body)) {
			if rest, ok := strings.CutPrefix(line, name+" "); ok {
				v, _ := strconv.ParseFloat(strings.TrimSpace(rest), 64)
				return v
			}
		}
		return 0
	}
	return get(fmt.Sprintf(format, "sum")), get(fmt.Sprintf(format, "count"))
}

// proxyMapCount is the number of elements in an nftables map of the node.
func proxyMapCount(ctx context.Context, n *lab.Node, family, table, name string) (int, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", n.Name, "nft", "-j", "list", "map", family, table, name).Output()
	if err != nil {
		return 0, err
	}
	var doc struct {
		Nftables []struct {
			Map *struct {
				Elem []json.RawMessage `json:"elem"`
			} `json:"map"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return 0, err
	}
	for _, o := range doc.Nftables {
		if o.Map != nil {
			return len(o.Map.Elem), nil
		}
	}
	return 0, nil
}

// proxyIptablesCount is the number of Service jumps in KUBE-SERVICES.
func proxyIptablesCount(ctx context.Context, n *lab.Node) (int, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", n.Name, "iptables-save", "-t", "nat").Output()
	if err != nil {
		return 0, err
	}
	c := 0
	for line := range strings.Lines(string(out)) {
		if strings.HasPrefix(line, "-A KUBE-SERVICES ") && strings.Contains(line, "-j KUBE-SVC-") {
			c++
		}
	}
	return c, nil
}

// proxyRSS is VmRSS of pid in KiB.
func proxyRSS(pid int) int64 { return procMemory(pid)["VmRSS"] >> 10 }

// proxyMonitor follows `nft monitor new <what>` in a node's netns and
// remembers when each line that keep accepts was first seen.
type proxyMonitor struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	seen []proxyLine
}

type proxyLine struct {
	at   time.Time
	text string
}

// proxyStartMonitor starts `nft monitor new <what>` ("elements", "rules")
// in n's netns, keeping the lines keep accepts.
func proxyStartMonitor(n *lab.Node, what string, keep func(line string) bool) (*proxyMonitor, error) {
	m := &proxyMonitor{cmd: exec.Command("ip", "netns", "exec", n.Name, "nft", "monitor", "new", what)}
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := m.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := m.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<24)
		for sc.Scan() {
			if t := sc.Text(); keep(t) {
				m.mu.Lock()
				m.seen = append(m.seen, proxyLine{time.Now(), t})
				m.mu.Unlock()
			}
		}
	}()
	return m, nil
}

// wait returns when a kept line containing key was seen, or false at
// timeout.
func (m *proxyMonitor) wait(key string, timeout time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		m.mu.Lock()
		for _, l := range m.seen {
			if strings.Contains(l.text, key) {
				m.mu.Unlock()
				return l.at, true
			}
		}
		m.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
	return time.Time{}, false
}

// reset forgets the lines seen so far.
func (m *proxyMonitor) reset() {
	m.mu.Lock()
	m.seen = m.seen[:0]
	m.mu.Unlock()
}

func (m *proxyMonitor) stop() { _ = m.cmd.Process.Kill(); _ = m.cmd.Wait() }

// proxyElemKey is how `nft monitor` prints the ClusterIP's service-ips
// element.
func proxyElemKey(ip string) string { return "{ " + ip + " . " }

// proxyAddServices adds proxyAdded Services one at a time and records, per
// side, the time from the EndpointSlice write returning to the element.
func proxyAddServices(ctx context.Context, b *testing.B, client kubernetes.Interface, sides []*proxySide, apiWrites *[]time.Duration) error {
	mons := make([]*proxyMonitor, len(sides))
	for i, s := range sides {
		m, err := proxyStartMonitor(s.node, "elements", func(l string) bool { return strings.Contains(l, "service-ips") })
		if err != nil {
			return err
		}
		defer m.stop()
		mons[i] = m
	}
	time.Sleep(2 * time.Second) // monitors subscribed
	// Index -1 is an uncounted warm-up (the first run lost the first one
	// while the monitors were starting under load).
	for i := -1; i < proxyAdded; i++ {
		t0 := time.Now()
		ip, err := proxyCreate(ctx, client, fmt.Sprintf("added-%02d", i+1), proxyServices+i+1)
		if err != nil {
			return err
		}
		t1 := time.Now()
		if i < 0 {
			for k := range sides {
				mons[k].wait(proxyElemKey(ip), proxyAddTimeout)
			}
			continue
		}
		*apiWrites = append(*apiWrites, t1.Sub(t0))
		for k, s := range sides {
			at, ok := mons[k].wait(proxyElemKey(ip), proxyAddTimeout)
			if !ok {
				b.Logf("%s: Service %s not programmed within %v", s.name, ip, proxyAddTimeout)
				continue
			}
			s.added = append(s.added, max(at.Sub(t1), 0))
		}
		time.Sleep(time.Second) // let both settle before the next one
	}
	return nil
}

func proxyPct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func proxyMS(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/1e6) }

func proxyRatio(a, b float64) string {
	if a <= 0 || b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.1fx", b/a)
}

func proxyReport(knit, nft, ipt *proxySide, written time.Duration, apiWrites []time.Duration, wall time.Duration) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%d Services x %d endpoints written in %.1f s (%d writers); added Service+slice write p50 %s\n",
		proxyServices, proxyEndpoints, written.Seconds(), proxyWriters, proxyMS(proxyPct(apiWrites, 0.5)))
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "metric\tknit\tkube-proxy nftables\tratio (kube-proxy/knit)\tkube-proxy iptables")
	prog := func(s *proxySide, limit time.Duration) string {
		if s.programmed == 0 {
			return fmt.Sprintf("did not finish within %v", limit)
		}
		return fmt.Sprintf("%.1f s", s.programmed.Seconds())
	}
	fmt.Fprintf(w, "start to all programmed\t%s\t%s\t%s\t%s\n", prog(knit, proxyProgramTimeout), prog(nft, proxyProgramTimeout),
		proxyRatio(knit.programmed.Seconds(), nft.programmed.Seconds()), prog(ipt, proxyIptablesTimeout))
	fmt.Fprintf(w, "first full sync (own metric)\t%s\t%s\t\t%s\n", knit.firstSync, nft.firstSync, ipt.firstSync)
	for _, q := range []struct {
		name string
		p    float64
	}{{"added Service p50", 0.5}, {"added Service p99", 0.99}} {
		a, c := proxyPct(knit.added, q.p), proxyPct(nft.added, q.p)
		fmt.Fprintf(w, "%s (n=%d/%d)\t%s\t%s\t%s\t-\n", q.name, len(knit.added), len(nft.added), proxyMS(a), proxyMS(c),
			proxyRatio(float64(a), float64(c)))
	}
	fmt.Fprintf(w, "partial sync (own metric, mean)\t%s\t%s\t\t-\n", knit.partial, nft.partial)
	us := func(d time.Duration) string { return fmt.Sprintf("%.0f us", float64(d)/1e3) }
	for _, q := range []struct {
		name string
		lat  func(*proxySide) []time.Duration
		p    float64
	}{
		{"first packet p50, 10 Services", func(s *proxySide) []time.Duration { return s.lat10 }, 0.5},
		{"first packet p99, 10 Services", func(s *proxySide) []time.Duration { return s.lat10 }, 0.99},
		{"first packet p50, 10,000 Services", func(s *proxySide) []time.Duration { return s.lat10k }, 0.5},
		{"first packet p99, 10,000 Services", func(s *proxySide) []time.Duration { return s.lat10k }, 0.99},
	} {
		a, c := proxyPct(q.lat(knit), q.p), proxyPct(q.lat(nft), q.p)
		fmt.Fprintf(w, "%s (n=%d/%d)\t%s\t%s\t%s\t-\n", q.name, len(q.lat(knit)), len(q.lat(nft)), us(a), us(c),
			proxyRatio(float64(a), float64(c)))
	}
	flat := func(s *proxySide) string {
		a, b := proxyPct(s.lat10, 0.99), proxyPct(s.lat10k, 0.99)
		if a == 0 || b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2fx", float64(b)/float64(a))
	}
	fmt.Fprintf(w, "first packet p99 10,000 / 10 Services\t%s\t%s\t\t-\n", flat(knit), flat(nft))
	fmt.Fprintf(w, "RSS after first sync\t%d MB\t%d MB\t%s\t%d MB\n", knit.rss/1024, nft.rss/1024,
		proxyRatio(float64(knit.rss), float64(nft.rss)), ipt.rss/1024)
	fmt.Fprintf(w, "RSS at end\t%d MB\t%d MB\t%s\t%d MB\n", knit.rssEnd/1024, nft.rssEnd/1024,
		proxyRatio(float64(knit.rssEnd), float64(nft.rssEnd)), ipt.rssEnd/1024)
	w.Flush()
	verdict := "met"
	if p := proxyPct(knit.added, 0.99); p > proxyTargetAdd || len(knit.added) < proxyAdded {
		verdict = "MISSED"
	}
	flatVerdict := "met"
	if a, b := proxyPct(knit.lat10, 0.99), proxyPct(knit.lat10k, 0.99); a == 0 || b == 0 || float64(b) > proxyLatTarget*float64(a) {
		flatVerdict = "MISSED"
	}
	fmt.Fprintf(&sb, "target: knit added Service p99 <= %v: %s; first packet p99 at 10,000 within %.1fx of 10: %s; wall %.0f s\n",
		proxyTargetAdd, verdict, proxyLatTarget, flatVerdict, wall.Seconds())
	return sb.String()
}
