package proxy

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/knftables"
)

var update = flag.Bool("update", false, "rewrite the golden rulesets in testdata/golden")

// TestGoldenRulesets renders each Service shape alone (with this node) and
// compares the whole table with testdata/golden/<shape>.nft.
func TestGoldenRulesets(t *testing.T) {
	for _, s := range shapes() {
		t.Run(s.name, func(t *testing.T) {
			objs := append([]runtime.Object{node(thisNode, "zone-a", nodeIP, nodeIP6)}, s.objs...)
			h := newHarness(t, testConfig(), nil, objs...)
			h.sync()
			golden(t, filepath.Join("testdata", "golden", s.name+".nft"), h.fake.Dump())
		})
	}
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run TestGoldenRulesets -update)", err)
	}
	if string(want) != got {
		t.Errorf("ruleset differs from %s (rerun with -update if intended):\n%s", path, lineDiff(string(want), got))
	}
}

// lineDiff lists lines only in want (-) or only in got (+).
func lineDiff(want, got string) string {
	w, g := map[string]int{}, map[string]int{}
	for _, l := range strings.Split(want, "\n") {
		w[l]++
	}
	for _, l := range strings.Split(got, "\n") {
		g[l]++
	}
	var b strings.Builder
	for _, l := range strings.Split(want, "\n") {
		if g[l] == 0 {
			fmt.Fprintf(&b, "- %s\n", l)
		}
	}
	for _, l := range strings.Split(got, "\n") {
		if w[l] == 0 {
			fmt.Fprintf(&b, "+ %s\n", l)
		}
	}
	return b.String()
}

// normalize sorts the element lines of a dump: the fake keeps elements in
// insertion order, which depends on the history of partial syncs, while
// the kernel's order is its own anyway.
func normalize(dump string) string {
	var other, elems []string
	for _, l := range strings.Split(dump, "\n") {
		if strings.HasPrefix(l, "add element ") {
			elems = append(elems, l)
		} else {
			other = append(other, l)
		}
	}
	sort.Strings(elems)
	return strings.Join(append(other, elems...), "\n")
}

// settle deletes stale chains now, so that tables can be compared.
func (h *harness) settle() {
	h.t.Helper()
	for c := range h.p.backend.stale {
		h.p.backend.stale[c] = time.Time{}
	}
	h.sync()
	if len(h.p.backend.stale) != 0 {
		h.t.Fatalf("stale chains left: %v", h.p.backend.stale)
	}
}

// partialSyncStep is one change in the PartialSyncsEqualFullSync tests.
type partialSyncStep struct {
	name string
	do   func()
}

// partialSyncSteps are the changes, made through the API of h (loaded with
// allShapes), that the PartialSyncsEqualFullSync tests of both backends
// apply one partial sync at a time.
func partialSyncSteps(h *harness) []partialSyncStep {
	return []partialSyncStep{
		{"add a Service", func() { h.addService(service("ns2", "new", "10.43.1.1", withNodePort(31001))) }},
		{"its endpoints appear", func() {
			h.addSlice(slice("ns2", "new", "new-1", 8080, eps(3, "10.42.5", otherNode)))
		}},
		{"scale past the inline limit (a map appears)", func() {
			h.updateSlice(slice("ns2", "new", "new-1", 8080, eps(inlineEndpointsMax+5, "10.42.5", otherNode)))
		}},
		{"change one endpoint in the map", func() {
			e := eps(inlineEndpointsMax+5, "10.42.5", otherNode)
			e[3].ip = "10.42.6.3"
			h.updateSlice(slice("ns2", "new", "new-1", 8080, e))
		}},
		{"scale down to one (the map goes)", func() {
			h.updateSlice(slice("ns2", "new", "new-1", 8080, eps(1, "10.42.5", otherNode)))
		}},
		{"affinity endpoint goes away", func() {
			h.updateSlice(slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.2.15", node: otherNode}}))
		}},
		{"affinity timeout changes", func() {
			h.updateService(service("ns1", "sticky", "10.43.0.30", withAffinity(60)))
		}},
		{"affinity timeout and policy change at once (chains go, sets re-created)", func() {
			h.updateService(service("ns1", "sticky", "10.43.0.30", withAffinity(30), withITPLocal))
			h.updateSlice(slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.2.15", node: otherNode}, {ip: "10.42.1.15", node: thisNode}}))
		}},
		{"ETP Local gains a local endpoint", func() {
			h.updateSlice(slice("ns1", "lbr", "lbr-1", 8080, []ep{{ip: "10.42.2.13", node: otherNode}, {ip: "10.42.1.13", node: thisNode}}))
		}},
		{"all endpoints removed", func() { h.deleteSlice("ns1", "web-1") }},
		{"a Service deleted", func() { h.deleteService("ns1", "np") }},
		{"a dual-stack Service deleted", func() { h.deleteService("ns1", "dual") }},
		{"source ranges change", func() {
			s := service("ns1", "fw", "10.43.0.37", withLoadBalancer(30037, 0, "192.0.2.37"))
			s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/28"}
			h.updateService(s)
		}},
		{"externalIP conflict", func() { h.addService(service("ns2", "clash", "10.43.1.2", withExternalIPs("192.0.2.26"))) }},
		{"conflict winner deleted", func() { h.deleteService("ns1", "ext") }},
		{"ClusterIP becomes headless-like (type ExternalName)", func() {
			s := service("ns1", "one", "10.43.0.21")
			s.Spec.Type = corev1.ServiceTypeExternalName
			h.updateService(s)
		}},
	}
}

// TestPartialSyncsEqualFullSync: after any series of changes applied by
// partial syncs, the table is exactly what a full sync of the final state
// renders in a fresh table. This is what makes partial syncs safe.
func TestPartialSyncsEqualFullSync(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	steps := partialSyncSteps(h)
	for _, st := range steps {
		st.do()
		h.sync()
		if h.fake.LastTransaction == nil {
			t.Fatalf("%s: no transaction", st.name)
		}
	}
	h.settle()

	// The final state, from scratch.
	fresh := newHarness(t, testConfig(), nil, h.objects()...)
	fresh.sync()
	if got, want := h.fake.Dump(), fresh.fake.Dump(); normalize(got) != normalize(want) {
		t.Errorf("partial syncs diverged from a full render:\n%s", lineDiff(want, got))
	}
}

// TestPartialSyncIsSmall: one new Service in a table of many sends only its
// own chain and elements, not the table.
func TestPartialSyncIsSmall(t *testing.T) {
	var objs []runtime.Object
	for i := range 200 {
		name := fmt.Sprintf("s%d", i)
		objs = append(objs,
			service("bulk", name, fmt.Sprintf("10.43.%d.%d", 10+i/250, i%250+1)),
			slice("bulk", name, name+"-1", 8080, eps(10, fmt.Sprintf("10.44.%d", i), otherNode)))
	}
	h := newHarness(t, testConfig(), nil, objs...)
	h.sync()
	full := h.fake.LastTransaction.NumOperations()
	h.addService(service("ns2", "new", "10.43.200.1"))
	h.addSlice(slice("ns2", "new", "new-1", 8080, eps(10, "10.42.5", otherNode)))
	h.sync()
	ops := h.fake.LastTransaction.NumOperations()
	// chain add + flush + rule, cluster-ips and service-ips elements, and
	// the 10 endpoints in the endpoints map.
	if ops > 16 {
		t.Errorf("partial sync of one Service sent %d operations (full sync: %d):\n%s", ops, full, h.fake.LastTransaction)
	}
	if n := testutil.CollectAndCount(h.p.m.syncDuration); n != 2 {
		t.Errorf("sync duration series: %d, want full and partial", n)
	}
}

// TestNothingBeforeSync: no transaction before the informers have synced
// and Run has started; Ready turns true after the first full sync.
func TestNothingBeforeSyncAndReady(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	if h.fake.LastTransaction != nil || h.p.Ready() {
		t.Fatal("applied before the first sync")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- h.p.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for !h.p.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("not ready after 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A change is programmed by the loop on its own.
	if err := func() error {
		_, err := h.client.CoreV1().Services("ns2").Create(ctx, service("ns2", "late", "10.43.1.9"), metav1.CreateOptions{})
		return err
	}(); err != nil {
		t.Fatal(err)
	}
	for {
		h.fake.RLock()
		ok := h.fake.Table.Sets["cluster-ips-v4"].FindElement("10.43.1.9") != nil
		h.fake.RUnlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("loop did not program the new Service")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run returned %v", err)
	}
	if h.fake.Table == nil || len(h.fake.Table.Chains) == 0 {
		t.Error("Run must not tear down the table on return")
	}
}

// TestFailedSyncFallsBackToFull: a transaction the kernel refuses changes
// nothing, is counted, and the next sync is a full one that repairs.
func TestFailedSyncFallsBackToFull(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	before := h.fake.Dump()
	// Sabotage: someone deletes one of our elements behind our back, so the
	// next partial sync, which deletes it, fails.
	tx := h.fake.NewTransaction()
	tx.Delete(&knftables.Element{Map: "service-ips-v4", Key: []string{"10.43.0.20", "tcp", "80"}})
	if err := h.fake.Run(context.Background(), tx); err != nil {
		t.Fatal(err)
	}
	h.deleteService("ns1", "web")
	if _, err := h.p.syncOnce(context.Background()); err == nil {
		t.Fatal("partial sync against a damaged table should fail")
	}
	if got := testutil.ToFloat64(h.p.m.syncErrors.WithLabelValues("partial")); got != 1 {
		t.Errorf("sync errors = %v", got)
	}
	if !h.p.needFull.Load() {
		t.Fatal("no full sync requested after a failure")
	}
	h.sync() // full: the table matches the state again
	if h.fake.Table.Sets["cluster-ips-v4"].FindElement("10.43.0.20") != nil {
		t.Fatal("full sync did not apply the deletion")
	}
	h.addService(service("ns1", "web", "10.43.0.20"))
	h.sync()
	h.settle()
	if after := h.fake.Dump(); normalize(after) != normalize(before) {
		t.Errorf("table differs after repair:\n%s", lineDiff(before, after))
	}
}

// TestBadObjectsSkipped: what rules cannot express is skipped with a metric;
// everything else keeps working.
func TestBadObjectsSkipped(t *testing.T) {
	bad := service("ns3", "bad", "10.43.3.1", withPorts(
		corev1.ServicePort{Name: "zero", Port: 0, Protocol: corev1.ProtocolTCP},
		corev1.ServicePort{Name: "weird", Port: 80, Protocol: "ICMP"},
		corev1.ServicePort{Name: "ok", Port: 81, Protocol: corev1.ProtocolTCP},
	), withExternalIPs("not-an-ip", "192.0.2.99"))
	badIP := service("ns3", "badip", "10.43.3.300")
	badSlice := slice("ns3", "bad", "bad-1", 8080, []ep{{ip: "10.42.9.1", node: otherNode}},
		withSlicePorts(
			discoveryv1.EndpointPort{Name: ptr("ok"), Port: ptr(int32(8081)), Protocol: ptr(corev1.ProtocolTCP)},
			discoveryv1.EndpointPort{Name: ptr("nop"), Protocol: ptr(corev1.ProtocolTCP)},
		))
	badSlice.Endpoints = append(badSlice.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.42.9.x"}})
	objs := append(allShapes(), bad, badIP, badSlice)
	h := newHarness(t, testConfig(), nil, objs...)
	h.sync()
	if got := testutil.ToFloat64(h.p.m.invalid.WithLabelValues("Service")); got != 4 {
		t.Errorf("invalid Service parts counted: %v, want 4", got)
	}
	if got := testutil.ToFloat64(h.p.m.invalid.WithLabelValues("EndpointSlice")); got != 2 {
		t.Errorf("invalid EndpointSlice parts counted: %v, want 2", got)
	}
	runFlowTests(t, h.fake, []flowTest{
		{name: "the valid port of a bad Service works", src: "10.42.1.100", dst: "10.43.3.1", port: 81, out: "10.42.9.1:8081"},
		{name: "its valid externalIP works", src: "203.0.113.9", dst: "192.0.2.99", port: 81, out: "10.42.9.1:8081", masq: true},
		{name: "other Services are unaffected", src: "10.42.1.100", dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080"},
	})
}

func TestTrackersDropCancelledChanges(t *testing.T) {
	tr := newServiceTracker()
	name := types.NamespacedName{Namespace: "a", Name: "b"}
	a := convertService(service("a", "b", "10.43.0.1"), nil, quiet)
	b := convertService(service("a", "b", "10.43.0.2"), nil, quiet)
	if !tr.update(name, a, b) {
		t.Fatal("real change not recorded")
	}
	if tr.update(name, b, a) {
		t.Fatal("change back to the applied state should cancel out")
	}
	if len(tr.changes) != 0 {
		t.Fatalf("cancelled change kept: %v", tr.changes)
	}
	if tr.update(name, nil, nil) {
		t.Fatal("nil to nil is no change")
	}

	et := newEndpointTracker(time.Now())
	s1 := convertSlice(slice("a", "b", "b-1", 80, eps(2, "10.42.0", "")), "", quiet)
	s2 := convertSlice(slice("a", "b", "b-1", 80, eps(3, "10.42.0", "")), "", quiet)
	if !et.update(name, "b-1", s1, time.Time{}) {
		t.Fatal("new slice not recorded")
	}
	endpoints := map[types.NamespacedName]portEndpoints{}
	et.checkout(endpoints)
	if !et.update(name, "b-1", s2, time.Time{}) {
		t.Fatal("slice change not recorded")
	}
	if et.update(name, "b-1", s1, time.Time{}) {
		t.Fatal("slice back to applied should cancel out")
	}
	if changed, _ := et.checkout(endpoints); len(changed) != 0 {
		t.Fatalf("cancelled slice change checked out: %v", changed)
	}
	if et.update(name, "other", nil, time.Time{}) {
		t.Fatal("deleting an unknown slice is no change")
	}
}

// TestEndpointsMoveBetweenSlices: an endpoint seen in two slices of a
// Service is one endpoint; removing one slice keeps it.
func TestEndpointsMoveBetweenSlices(t *testing.T) {
	h := newHarness(t, testConfig(), nil,
		service("ns1", "web", "10.43.0.20"),
		slice("ns1", "web", "web-1", 8080, []ep{{ip: "10.42.1.5", node: thisNode}}),
		slice("ns1", "web", "web-2", 8080, []ep{{ip: "10.42.1.5", node: thisNode}, {ip: "10.42.2.7", node: otherNode}}),
	)
	h.sync()
	runFlowTests(t, h.fake, []flowTest{{name: "deduplicated", src: "10.42.1.100", dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080"}})
	h.deleteSlice("ns1", "web-1")
	h.sync()
	runFlowTests(t, h.fake, []flowTest{{name: "still both", src: "10.42.1.100", dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080"}})
}

// TestNodeTopologyChange: a zone label change re-renders everything.
func TestNodeTopologyChange(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	runFlowTests(t, h.fake, []flowTest{{name: "zone-a", src: "10.42.1.100", dst: "10.43.0.32", port: 80, out: "10.42.1.17:8080, 10.42.3.17:8080"}})
	h.do(func(ctx context.Context) error {
		_, err := h.client.CoreV1().Nodes().Update(ctx, node(thisNode, "zone-b", nodeIP, nodeIP6), metav1.UpdateOptions{})
		return err
	})
	if !h.p.needFull.Load() {
		t.Fatal("topology change must force a full sync")
	}
	h.sync()
	runFlowTests(t, h.fake, []flowTest{{name: "zone-b", src: "10.42.1.100", dst: "10.43.0.32", port: 80, out: "10.42.2.17:8080"}})
}

func TestNodePortAddresses(t *testing.T) {
	cfg := testConfig()
	cfg.NodePortAddresses = []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24")}
	h := newHarness(t, cfg, nil, allShapes()...)
	h.sync()
	golden(t, filepath.Join("testdata", "golden", "nodeport-addresses.nft"), h.fake.Dump())
	local := []netip.Addr{netip.MustParseAddr(nodeIP), netip.MustParseAddr("192.168.7.1")}
	res, _ := trace(t, h.fake, local, packet{src: netip.MustParseAddr("203.0.113.9"), dst: netip.MustParseAddr(nodeIP), proto: "tcp", dport: 30025})
	if res.out != "10.42.1.10:8080, 10.42.2.10:8080" {
		t.Errorf("NodePort on a listed address: %+v", res)
	}
	res, _ = trace(t, h.fake, local, packet{src: netip.MustParseAddr("203.0.113.9"), dst: netip.MustParseAddr("192.168.7.1"), proto: "tcp", dport: 30025})
	if res.out != "ACCEPT" {
		t.Errorf("NodePort on an unlisted address must not be served: %+v", res)
	}
}

// TestStaleUDPConntrack: when a UDP Service loses an endpoint, entries to
// its frontends that do not go to a serving endpoint are deleted.
func TestStaleUDPConntrack(t *testing.T) {
	udp := service("ns1", "dns2", "10.43.0.50", withPorts(corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, NodePort: 30053}))
	udp.Spec.Type = corev1.ServiceTypeNodePort
	h := newHarness(t, testConfig(), nil, udp, udpSlice("dns2", "10.42.2.1", "10.42.2.2"),
		service("ns1", "web", "10.43.0.20"), slice("ns1", "web", "web-1", 8080, eps(2, "10.42.1", thisNode)))
	h.sync()
	h.ct.last = nil
	h.updateSlice(udpSlice("dns2", "10.42.2.2"))
	h.sync()
	flt := h.ct.last[v4]
	if flt == nil {
		t.Fatal("no conntrack cleanup after a UDP endpoint went away")
	}
	flow := func(dst string, dport uint16, backend string, proto uint8) *netlink.ConntrackFlow {
		f := &netlink.ConntrackFlow{}
		f.Forward.Protocol, f.Reverse.Protocol = proto, proto
		f.Forward.SrcIP, f.Forward.DstIP, f.Forward.DstPort = netip.MustParseAddr("10.42.1.100").AsSlice(), netip.MustParseAddr(dst).AsSlice(), dport
		f.Reverse.SrcIP, f.Reverse.SrcPort = netip.MustParseAddr(backend).AsSlice(), 5353
		return f
	}
	for _, tc := range []struct {
		name string
		f    *netlink.ConntrackFlow
		want bool
	}{
		{"to the removed endpoint", flow("10.43.0.50", 53, "10.42.2.1", unix.IPPROTO_UDP), true},
		{"to the live endpoint", flow("10.43.0.50", 53, "10.42.2.2", unix.IPPROTO_UDP), false},
		{"NodePort to the removed endpoint", flow(nodeIP, 30053, "10.42.2.1", unix.IPPROTO_UDP), true},
		{"TCP is never touched", flow("10.43.0.50", 53, "10.42.2.1", unix.IPPROTO_TCP), false},
		{"another destination", flow("10.43.0.51", 53, "10.42.2.1", unix.IPPROTO_UDP), false},
	} {
		if got := flt.MatchConntrackFlow(tc.f); got != tc.want {
			t.Errorf("%s: match=%v want %v", tc.name, got, tc.want)
		}
	}
	// Service deleted: everything to its frontends goes.
	h.ct.last = nil
	h.deleteService("ns1", "dns2")
	h.sync()
	if flt = h.ct.last[v4]; flt == nil || !flt.MatchConntrackFlow(flow("10.43.0.50", 53, "10.42.2.2", unix.IPPROTO_UDP)) {
		t.Error("entries of a deleted UDP Service not deleted")
	}
	// TCP-only changes never call conntrack.
	h.ct.last = nil
	h.updateSlice(slice("ns1", "web", "web-1", 8080, eps(1, "10.42.1", thisNode)))
	h.sync()
	if h.ct.last != nil {
		t.Error("conntrack called for a TCP-only change")
	}
}

// TestHealthCheckNodePort: the health check port answers with the local
// endpoint count (200) or 503, and follows endpoint changes.
func TestHealthCheckNodePort(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	get := func(port string) (int, string) {
		t.Helper()
		h.hcMu.Lock()
		addr := h.hcAddrs[":"+port]
		h.hcMu.Unlock()
		if addr == "" {
			t.Fatalf("no health check server for port %s", port)
		}
		resp, err := http.Get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := get("32027"); code != 200 || !strings.Contains(body, `"localEndpoints": 1`) || !strings.Contains(body, `"name": "lb"`) {
		t.Errorf("lb with a local endpoint: %d %s", code, body)
	}
	if code, body := get("32028"); code != 503 || !strings.Contains(body, `"localEndpoints": 0`) {
		t.Errorf("lbr without a local endpoint: %d %s", code, body)
	}
	h.updateSlice(slice("ns1", "lbr", "lbr-1", 8080, []ep{{ip: "10.42.1.13", node: thisNode}, {ip: "10.42.1.14", node: thisNode}}))
	h.sync()
	if code, body := get("32028"); code != 200 || !strings.Contains(body, `"localEndpoints": 2`) {
		t.Errorf("lbr after gaining endpoints: %d %s", code, body)
	}
}

// TestProgrammingLatencyMetric: the trigger time annotation feeds the
// network programming latency histogram.
func TestProgrammingLatencyMetric(t *testing.T) {
	h := newHarness(t, testConfig(), nil, service("ns1", "web", "10.43.0.20"))
	h.sync()
	h.addSlice(slice("ns1", "web", "web-1", 8080, eps(1, "10.42.1", thisNode), withTrigger(time.Now())))
	h.sync()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var count uint64
	for _, mf := range mfs {
		if mf.GetName() == "knit_proxy_network_programming_latency_seconds" {
			count = mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	if count != 1 {
		t.Errorf("latency observations = %d, want 1", count)
	}
	if got := testutil.ToFloat64(h.p.m.elements.WithLabelValues("service-ips-v4")); got != 1 {
		t.Errorf("service-ips-v4 elements metric = %v", got)
	}
	if got := testutil.ToFloat64(h.p.m.rules); got == 0 {
		t.Error("rules metric not set")
	}
}

func TestConfigValidation(t *testing.T) {
	for _, c := range []Config{{MasqueradeMark: 0x3}, {Backend: "ipvs"}} {
		if err := c.defaults(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	c := Config{}
	if err := c.defaults(); err != nil || c.MasqueradeMark != 0x4000 || c.Backend != BackendAuto || c.SyncPeriod == 0 || c.MinSyncPeriod == 0 {
		t.Errorf("defaults: %+v %v", c, err)
	}
}

// failingNFT fails the Run calls whose number (from 1) is in fail.
type failingNFT struct {
	knftables.Interface
	runs int
	fail map[int]bool
}

func (f *failingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	f.runs++
	if f.fail[f.runs] {
		return errors.New("nft: injected failure")
	}
	return f.Interface.Run(ctx, tx)
}

// TestBackendAfterFailedFullSync: a full sync drops what the backend knew
// was applied before it builds anew; if it then fails, the backend makes
// the next sync full even when asked for a partial one, and the table ends
// up as a clean full sync makes it.
func TestBackendAfterFailedFullSync(t *testing.T) {
	fake := knftables.NewFake(knftables.InetFamily, tableName)
	nft := &failingNFT{Interface: fake, fail: map[int]bool{}}
	h := newHarness(t, testConfig(), nft, allShapes()...)
	h.fake = fake
	h.sync()
	// The next full sync's second transaction (the one that fills the
	// table) fails.
	nft.fail[nft.runs+2] = true
	if _, err := h.p.backend.sync(context.Background(), &h.p.st, nil, true); err == nil {
		t.Fatal("full sync with a failing transaction succeeded")
	}
	h.deleteService("ns1", "web")
	h.sync() // the proxier asks for a partial sync
	h.settle()

	var objs []runtime.Object
	for _, o := range allShapes() {
		if s, ok := o.(*corev1.Service); ok && s.Name == "web" {
			continue
		}
		objs = append(objs, o)
	}
	want := newHarness(t, testConfig(), nil, objs...)
	want.sync()
	if got, want := normalize(fake.Dump()), normalize(want.fake.Dump()); got != want {
		t.Errorf("table after a failed full sync and a partial one differs from a full sync:\n%s", lineDiff(want, got))
	}
}
