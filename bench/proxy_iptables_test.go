package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"k8s.io/client-go/kubernetes"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/sandbox"
)

// proxyIPTServices is the default scale of BenchmarkProxyIPTables: kube-proxy's
// iptables mode does not finish its first sync of 10,000 Services within 10
// minutes here, so the iptables backends are compared at a scale where both
// finish. KNIT_BENCH_PROXY_IPT_SERVICES overrides it.
const proxyIPTServices = 1000

// BenchmarkProxyIPTables compares knit's iptables backend with kube-proxy
// v1.37.2 in iptables mode, side by side in one lab run, both on the lab's
// default iptables (iptables-nft):
//
//	netns node1: knit agent --components=proxy --proxy-backend=iptables
//	netns node2: kube-proxy --proxy-mode=iptables
//
// The workload is BenchmarkProxy's (Services of one TCP port with a slice of
// 10 ready endpoints written by the benchmark) at proxyIPTServices Services,
// written before either proxy starts; both start together and are timed
// until KNIT-SERVICES / KUBE-SERVICES holds every Service. Then proxyAdded
// Services are added one at a time and timed from the EndpointSlice write
// returning until `nft monitor` in each netns shows the ClusterIP's rule in
// the services chain (iptables-nft rules are nftables rules).
//
//	go test -run '^$' -bench BenchmarkProxyIPTables -benchtime 1x -timeout 60m ./bench/
func BenchmarkProxyIPTables(b *testing.B) {
	sandbox.Require(b)
	ctx := context.Background()
	began := time.Now()
	n := proxyIPTServices
	if v := os.Getenv("KNIT_BENCH_PROXY_IPT_SERVICES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			b.Fatalf("KNIT_BENCH_PROXY_IPT_SERVICES=%q: want a positive number", v)
		}
	}
	cl, cpBin, dir := benchLab(ctx, b, "proxy-iptables", lab.Options{Nodes: 2, Components: "proxy"})
	defer cl.Down()
	n1, n2 := cl.Nodes[0], cl.Nodes[1]
	// What is programmed before the benchmark's Services (the agents run
	// the nftables backend until now).
	base := proxyBaseline(ctx, b, cl, n1)
	client := writerClient(b, cl)
	if err := cl.EnsureNamespace(ctx, proxyNamespace); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	t0 := time.Now()
	if err := proxyWriteAll(ctx, client, n); err != nil {
		b.Fatal(err)
	}
	written := time.Since(t0)
	target := base + n

	knit := &proxySide{name: "knit iptables", node: n1, metrics: n1.HealthURL() + "/metrics",
		count: func(ctx context.Context) (int, error) { return proxyIPTCount(ctx, n1, "KNIT-SERVICES", "KNIT-SVC-") },
		pid:   n1.AgentPID, fullSum: `knit_proxy_sync_duration_seconds_%s{kind="full"}`,
		partSum: `knit_proxy_sync_duration_seconds_%s{kind="partial"}`}
	kp := &proxySide{name: "kube-proxy iptables", node: n2, metrics: "http://" + n2.IP + ":10249/metrics",
		count:   func(ctx context.Context) (int, error) { return proxyIPTCount(ctx, n2, "KUBE-SERVICES", "KUBE-SVC-") },
		fullSum: `kubeproxy_sync_full_proxy_rules_duration_seconds_%s{ip_family="IPv4"}`,
		partSum: `kubeproxy_sync_partial_proxy_rules_duration_seconds_%s{ip_family="IPv4"}`}
	kp.pid = func() int { return kp.cmd.Process.Pid }

	knit.started = time.Now()
	if err := n1.StartAgentWith("--proxy-backend", "iptables"); err != nil {
		b.Fatal(err)
	}
	kp.started = time.Now()
	cmd, err := proxyKubeProxy(cpBin, cl, n2, "iptables")
	if err != nil {
		b.Fatal(err)
	}
	kp.cmd = cmd
	defer proxyStop(kp.cmd)
	var wg sync.WaitGroup
	for _, s := range []*proxySide{knit, kp} {
		wg.Go(func() { s.waitProgrammed(ctx, b, target, proxyProgramTimeout) })
	}
	wg.Wait()
	// iptables-save shows the rules as soon as iptables-restore is done,
	// a moment before the sync returns and its metric is observed.
	for _, s := range []*proxySide{knit, kp} {
		for deadline := time.Now().Add(10 * time.Second); s.programmed > 0 && s.firstSync == "" && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			if sum, count := s.histogram(s.fullSum); count > 0 {
				s.firstSync = fmt.Sprintf("%.2f s", sum/count)
			}
		}
	}
	if knit.programmed == 0 {
		b.Fatalf("knit did not program %d Services within %v (log: %s)", target, proxyProgramTimeout, filepath.Join(n1.Dir, "agent.log"))
	}

	sides := []*proxySide{knit}
	if kp.programmed > 0 {
		sides = append(sides, kp)
	}
	before := map[*proxySide][2]float64{}
	for _, s := range sides {
		sum, count := s.histogram(s.partSum)
		before[s] = [2]float64{sum, count}
	}
	var apiWrites []time.Duration
	if err := proxyIPTAdd(ctx, b, client, n, sides, &apiWrites); err != nil {
		b.Fatal(err)
	}
	for _, s := range sides {
		sum, count := s.histogram(s.partSum)
		if d := count - before[s][1]; d > 0 {
			s.partial = fmt.Sprintf("%.1f ms (%d syncs)", 1000*(sum-before[s][0])/d, int(d))
		}
		s.rssEnd = proxyRSS(s.pid())
	}
	b.StopTimer()

	table := proxyIPTReport(n, knit, kp, written, apiWrites, time.Since(began))
	b.Log(table)
	if err := os.WriteFile(filepath.Join(dir, "results.txt"), []byte(table), 0o644); err != nil {
		b.Error(err)
	}
}

// proxyIPTCount is the number of Service jumps in a services chain of the
// node's nat table.
func proxyIPTCount(ctx context.Context, n *lab.Node, chain, target string) (int, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", n.Name, "iptables-save", "-t", "nat").Output()
	if err != nil {
		return 0, err
	}
	c := 0
	for line := range strings.Lines(string(out)) {
		if strings.HasPrefix(line, "-A "+chain+" ") && strings.Contains(line, "-j "+target) {
			c++
		}
	}
	return c, nil
}

// proxyIPTAdd adds proxyAdded Services one at a time and records, per side,
// the time from the EndpointSlice write returning to the ClusterIP's rule
// appearing in the side's services chain (seen by `nft monitor new rules`).
func proxyIPTAdd(ctx context.Context, b *testing.B, client kubernetes.Interface, n int, sides []*proxySide, apiWrites *[]time.Duration) error {
	// The nat services chain's jump for the ClusterIP: the filter table has
	// a chain of the same name with reject rules for Services without
	// endpoints (as the new Service is, until its slice is read).
	match := map[string][2]string{
		"knit iptables":       {" ip nat KNIT-SERVICES ", "jump KNIT-SVC-"},
		"kube-proxy iptables": {" ip nat KUBE-SERVICES ", "jump KUBE-SVC-"},
	}
	mons := make([]*proxyMonitor, len(sides))
	for i, s := range sides {
		mt := match[s.name]
		m, err := proxyStartMonitor(s.node, "rules", func(l string) bool { return strings.Contains(l, mt[0]) && strings.Contains(l, mt[1]) })
		if err != nil {
			return err
		}
		defer m.stop()
		mons[i] = m
	}
	key := func(ip string) string { return "daddr " + ip + " " }
	time.Sleep(2 * time.Second) // monitors subscribed
	for i := -1; i < proxyAdded; i++ {
		t0 := time.Now()
		ip, err := proxyCreate(ctx, client, fmt.Sprintf("added-%02d", i+1), n+i+1)
		if err != nil {
			return err
		}
		t1 := time.Now()
		if i < 0 { // an uncounted warm-up
			for _, m := range mons {
				m.wait(key(ip), proxyAddTimeout)
			}
			continue
		}
		*apiWrites = append(*apiWrites, t1.Sub(t0))
		for k, s := range sides {
			at, ok := mons[k].wait(key(ip), proxyAddTimeout)
			if !ok {
				b.Logf("%s: Service %s not programmed within %v", s.name, ip, proxyAddTimeout)
				continue
			}
			s.added = append(s.added, max(at.Sub(t1), 0))
		}
		for _, m := range mons {
			m.reset() // each sync re-adds the whole chain
		}
		time.Sleep(time.Second)
	}
	return nil
}

func proxyIPTReport(n int, knit, kp *proxySide, written time.Duration, apiWrites []time.Duration, wall time.Duration) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%d Services x %d endpoints written in %.1f s (%d writers); added Service+slice write p50 %s\n",
		n, proxyEndpoints, written.Seconds(), proxyWriters, proxyMS(proxyPct(apiWrites, 0.5)))
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "metric\tknit iptables\tkube-proxy iptables\tratio (kube-proxy/knit)")
	prog := func(s *proxySide) string {
		if s.programmed == 0 {
			return fmt.Sprintf("did not finish within %v", proxyProgramTimeout)
		}
		return fmt.Sprintf("%.1f s", s.programmed.Seconds())
	}
	fmt.Fprintf(w, "start to all programmed\t%s\t%s\t%s\n", prog(knit), prog(kp), proxyRatio(knit.programmed.Seconds(), kp.programmed.Seconds()))
	fmt.Fprintf(w, "first full sync (own metric)\t%s\t%s\t\n", knit.firstSync, kp.firstSync)
	for _, q := range []struct {
		name string
		p    float64
	}{{"added Service p50", 0.5}, {"added Service p99", 0.99}} {
		a, c := proxyPct(knit.added, q.p), proxyPct(kp.added, q.p)
		fmt.Fprintf(w, "%s (n=%d/%d)\t%s\t%s\t%s\n", q.name, len(knit.added), len(kp.added), proxyMS(a), proxyMS(c),
			proxyRatio(float64(a), float64(c)))
	}
	fmt.Fprintf(w, "partial sync (own metric, mean)\t%s\t%s\t\n", knit.partial, kp.partial)
	fmt.Fprintf(w, "RSS after first sync\t%d MB\t%d MB\t%s\n", knit.rss/1024, kp.rss/1024, proxyRatio(float64(knit.rss), float64(kp.rss)))
	fmt.Fprintf(w, "RSS at end\t%d MB\t%d MB\t%s\n", knit.rssEnd/1024, kp.rssEnd/1024, proxyRatio(float64(knit.rssEnd), float64(kp.rssEnd)))
	w.Flush()
	fmt.Fprintf(&sb, "wall %.0f s\n", wall.Seconds())
	return sb.String()
}
