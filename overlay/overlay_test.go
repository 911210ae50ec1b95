package overlay

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/knftables"
)

// harness runs a real Overlay against a fake API server, fake kernel and
// fake nftables.
type harness struct {
	t      *testing.T
	o      *Overlay
	client *fake.Clientset
	k      *fakeKernel
	nft    *knftables.Fake
	reg    *prometheus.Registry
	stop   func()
}

func startHarness(t *testing.T, cfg Config, nodes ...*corev1.Node) *harness {
	t.Helper()
	return startHarnessWith(t, cfg, newFixture().k, knftables.NewFake(knftables.InetFamily, nftTable), nil, nodes...)
}

// startHarnessWith runs an Overlay on the given kernel and nftables (to
// model a restart: a new Overlay on the old kernel); setup, if set, runs on
// the fake API client before anything starts.
func startHarnessWith(t *testing.T, cfg Config, k *fakeKernel, nft *knftables.Fake, setup func(*fake.Clientset), nodes ...*corev1.Node) *harness {
	t.Helper()
	return startHarnessLog(t, cfg, k, nft, setup, quietLog(), nodes...)
}

// startHarnessLog is startHarnessWith with the Overlay logging to log.
func startHarnessLog(t *testing.T, cfg Config, k *fakeKernel, nft *knftables.Fake, setup func(*fake.Clientset), log *slog.Logger, nodes ...*corev1.Node) *harness {
	t.Helper()
	h := &harness{t: t, k: k, nft: nft, reg: prometheus.NewRegistry()}
	h.client = fake.NewClientset()
	if setup != nil {
		setup(h.client)
	}
	for _, n := range nodes {
		if _, err := h.client.CoreV1().Nodes().Create(context.Background(), n.DeepCopy(), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	factory := informers.NewSharedInformerFactory(h.client, 0)
	o, err := New(cfg, Sources{Nodes: factory.Core().V1().Nodes(), Client: h.client}, h.reg, log)
	if err != nil {
		t.Fatal(err)
	}
	o.newKernel = func() (kernel, error) { return h.k, nil }
	o.newNFT = func() (knftables.Interface, error) { return h.nft, nil }
	noIPTables(o)
	h.o = o
	ctx, cancel := context.WithCancel(context.Background())
	factory.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	h.stop = sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v", err)
		}
		factory.Shutdown()
	})
	t.Cleanup(h.stop)
	return h
}

// eventually polls cond for up to 5 s.
func (h *harness) eventually(what string, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out waiting for %s; kernel:\n%s", what, h.k.state())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (h *harness) hasState(line string) func() bool {
	return func() bool { return strings.Contains(h.k.state(), line) }
}

func self(podCIDR, ip string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", Annotations: map[string]string{"someone": "else"}},
		Spec:       corev1.NodeSpec{PodCIDRs: []string{podCIDR}},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

func TestOverlayComponent(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t, BackendVXLAN)
	h := startHarness(t, cfg, self("10.42.1.0/24", "198.18.0.1"), peer2, peer3)

	h.eventually("ready", h.o.Ready)
	for _, l := range []string{
		"route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4 onlink proto 75",
		"route 10.42.3.0/24 via 10.42.3.0 dev knit-vx4 onlink proto 75",
	} {
		if !strings.Contains(h.k.state(), l) {
			t.Errorf("kernel lacks %q", l)
		}
	}
	if h.o.MTU() != 1450 {
		t.Errorf("MTU() = %d, want 1450", h.o.MTU())
	}
	if !strings.Contains(h.nft.Dump(), "masquerade fully-random") {
		t.Errorf("no masquerade rules:\n%s", h.nft.Dump())
	}

	// Own annotations published, others' kept, by a merge patch on n1 only.
	h.eventually("annotations", func() bool {
		n, err := h.client.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
		return err == nil && n.Annotations[AnnotationVTEPMAC] == ownMAC && n.Annotations[AnnotationPublicIP] == "198.18.0.1"
	})
	n1, _ := h.client.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	if n1.Annotations["someone"] != "else" {
		t.Error("foreign annotation lost")
	}
	for _, a := range h.client.Actions() {
		if a.GetVerb() == "patch" || a.GetVerb() == "update" {
			if a.GetVerb() != "patch" || a.(interface{ GetName() string }).GetName() != "n1" {
				t.Errorf("unexpected write %s", a)
			}
		}
	}
	if got := testutil.ToFloat64(h.o.m.peersKnown); got != 2 {
		t.Errorf("peers known = %v", got)
	}
	if got := testutil.ToFloat64(h.o.m.peersProgrammed.WithLabelValues("vxlan")); got != 2 {
		t.Errorf("peers programmed = %v", got)
	}

	// A node is deleted: its entries go.
	mustDo(t, h.client.CoreV1().Nodes().Delete(ctx, "n3", metav1.DeleteOptions{}))
	h.eventually("n3 removed", func() bool { return !strings.Contains(h.k.state(), "10.42.3.0") })

	// A bad node is skipped and counted, once.
	bad := knitNode("bad", 5, []string{"10.42.1.0/24"}, []string{"198.18.0.5"})
	_, err := h.client.CoreV1().Nodes().Create(ctx, bad, metav1.CreateOptions{})
	mustDo(t, err)
	h.eventually("skip counted", func() bool {
		return testutil.ToFloat64(h.o.m.peersSkipped.WithLabelValues(reasonOverlapping)) == 1
	})

	// A new node: reachable after one sync.
	_, err = h.client.CoreV1().Nodes().Create(ctx, knitNode("n4", 4, []string{"10.42.4.0/24"}, []string{"198.18.0.4"}), metav1.CreateOptions{})
	mustDo(t, err)
	h.eventually("n4 routed", h.hasState("route 10.42.4.0/24 via 10.42.4.0 dev knit-vx4 onlink proto 75"))

	// Someone deletes a route: the timer resync brings it back. (Shorten
	// the wait by kicking, as any Node event would.)
	deleteRoute(t, h.k, "10.42.2.0/24")
	h.o.kick()
	h.eventually("route restored", h.hasState("route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4"))
	if got := testutil.ToFloat64(h.o.m.peersSkipped.WithLabelValues(reasonOverlapping)); got != 1 {
		t.Errorf("skip counted %v times, want once", got)
	}
	if got := testutil.ToFloat64(h.o.m.errors.WithLabelValues("kernel")); got != 0 {
		t.Errorf("kernel errors = %v", got)
	}
}

// A restart finds everything in place and changes nothing: same kernel,
// same nftables, a new Overlay.
func TestOverlayRestartChangesNothing(t *testing.T) {
	cfg := testConfig(t, BackendVXLAN)
	nodes := []*corev1.Node{self("10.42.1.0/24", "198.18.0.1"), peer2, peer3}
	first := startHarness(t, cfg, nodes...)
	first.eventually("ready", first.o.Ready)
	first.stop()
	first.k.takeCalls()
	last := first.nft.LastTransaction

	second := startHarnessWith(t, cfg, first.k, first.nft, nil, nodes...)
	second.eventually("ready", second.o.Ready)
	if calls := first.k.takeCalls(); len(calls) != 0 {
		t.Errorf("restart changed the kernel:\n%s", lines(calls...))
	}
	if first.nft.LastTransaction != last {
		t.Error("restart rewrote the nftables table")
	}
}

// Without its own Node (or podCIDR) the overlay waits and touches nothing.
func TestOverlayWaitsForOwnNode(t *testing.T) {
	cfg := testConfig(t, BackendVXLAN)
	h := startHarness(t, cfg, peer2)
	time.Sleep(300 * time.Millisecond)
	if h.o.Ready() || len(h.k.takeCalls()) != 0 {
		t.Fatal("acted without this node's Node object")
	}
	_, err := h.client.CoreV1().Nodes().Create(context.Background(), self("10.42.1.0/24", "198.18.0.1"), metav1.CreateOptions{})
	mustDo(t, err)
	h.eventually("ready", h.o.Ready)
}

func TestRelevantChange(t *testing.T) {
	base := knitNode("n2", 2, []string{"10.42.2.0/24"}, []string{"198.18.0.2"})
	heartbeat := base.DeepCopy()
	heartbeat.ResourceVersion = "2"
	heartbeat.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, LastHeartbeatTime: metav1.Now()}}
	heartbeat.Annotations["unrelated"] = "x"
	mac := base.DeepCopy()
	mac.Annotations[AnnotationVTEPMAC] = "02:00:00:00:09:04"
	cidr := base.DeepCopy()
	cidr.Spec.PodCIDRs = []string{"10.42.9.0/24"}
	ip := base.DeepCopy()
	ip.Status.Addresses[0].Address = "198.18.0.9"
	for name, tt := range map[string]struct {
		cur  *corev1.Node
		want bool
	}{"heartbeat": {heartbeat, false}, "vtep mac": {mac, true}, "podCIDR": {cidr, true}, "node IP": {ip, true}} {
		if got := relevantChange(base, tt.cur); got != tt.want {
			t.Errorf("%s: relevantChange = %v, want %v", name, got, tt.want)
		}
	}
}

func mustAddr(s string) netip.Addr     { return netip.MustParseAddr(s) }
func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func TestNewRejectsBadConfig(t *testing.T) {
	for name, mutate := range map[string]func(*Config){
		"no node name":          func(c *Config) { c.NodeName = "" },
		"bad backend":           func(c *Config) { c.Backend = "gre" },
		"VNI too big":           func(c *Config) { c.VNI = 1 << 24 },
		"masquerade, no CIDRs":  func(c *Config) { c.ClusterCIDRs = nil },
		"port out of range":     func(c *Config) { c.Port = 70000 },
		"loopback node IP":      func(c *Config) { c.NodeIP = mustAddr("127.0.0.1") },
		"default route as CIDR": func(c *Config) { c.ClusterCIDRs = append(c.ClusterCIDRs, mustPrefix("0.0.0.0/0")) },
	} {
		cfg := testConfig(t, BackendVXLAN)
		mutate(&cfg)
		client := fake.NewClientset()
		f := informers.NewSharedInformerFactory(client, 0)
		if _, err := New(cfg, Sources{Nodes: f.Core().V1().Nodes(), Client: client}, prometheus.NewRegistry(), quietLog()); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
}

// API writes failing (server unreachable) never hold up or undo the kernel
// state: the publish is retried on its own, and syncs go on.
func TestOverlayAPIWritesFailing(t *testing.T) {
	cfg := testConfig(t, BackendVXLAN)
	refuse := func(c *fake.Clientset) {
		c.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, errors.New("connection refused")
		})
	}
	h := startHarnessWith(t, cfg, newFixture().k, knftables.NewFake(knftables.InetFamily, nftTable), refuse,
		self("10.42.1.0/24", "198.18.0.1"), peer2)
	h.eventually("ready", h.o.Ready)
	h.eventually("publish retried", func() bool { return testutil.ToFloat64(h.o.m.errors.WithLabelValues("annotations")) >= 2 })
	if !strings.Contains(h.k.state(), "route 10.42.2.0/24") {
		t.Error("route missing while the API server refuses writes")
	}
	if got := testutil.ToFloat64(h.o.m.errors.WithLabelValues("kernel")); got != 0 {
		t.Errorf("kernel errors = %v", got)
	}
}
