package overlay

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/testkit"
)

// The bad input, through the whole component (informer, sync loop,
// report, reconciler on the fake kernel): a peer with no podCIDR, a
// malformed annotation, an address of the wrong family, a podCIDR that
// overlaps this node's (and the other reasons render can skip for). Each is
// skipped with one warning naming the peer and the reason, and one count of
// knit_overlay_peers_skipped_total under that reason (not repeated by later
// syncs); the kernel is exactly as it was without the bad peer (no entry at
// all, the good peer untouched), and once the Node is fixed it is routed.
func TestOverlaySkipsBadPeers(t *testing.T) {
	const name = "peer5" // sorts after n2: see "VTEP MAC of another peer"
	good := knitNode(name, 5, []string{"10.42.5.0/24"}, []string{"198.18.0.5"})
	tests := []struct {
		name   string
		opts   []nodeOpt
		reason string
	}{
		{"no podCIDR", []nodeOpt{withPodCIDRs()}, reasonNoPodCIDR},
		{"malformed podCIDR", []nodeOpt{withPodCIDRs("10.42.5.0/33")}, reasonMalformedPodCIDR},
		{"malformed VTEP MAC annotation", []nodeOpt{withAnnotation(AnnotationVTEPMAC, "zz:zz")}, reasonMalformed},
		{"malformed public-ip annotation", []nodeOpt{withAnnotation(AnnotationPublicIP, "198.18.0.500")}, reasonMalformed},
		{"IPv6 address in the IPv4 public-ip", []nodeOpt{withAnnotation(AnnotationPublicIP, "fd00::5")}, reasonWrongFamily},
		{"IPv4 address in public-ip-v6", []nodeOpt{withAnnotation(AnnotationPublicIPv6, "198.18.0.5")}, reasonWrongFamily},
		{"two IPv4 podCIDRs", []nodeOpt{withPodCIDRs("10.42.5.0/24", "10.42.6.0/24")}, reasonWrongFamily},
		{"podCIDR inside this node's", []nodeOpt{withPodCIDRs("10.42.1.0/25")}, reasonOverlapping},
		{"podCIDR containing this node's", []nodeOpt{withPodCIDRs("10.42.0.0/20")}, reasonOverlapping},
		{"podCIDR outside the cluster CIDRs", []nodeOpt{withPodCIDRs("10.99.5.0/24")}, reasonOutsideClusterCIDR},
		{"no knit annotations", []nodeOpt{withoutAnnotations()}, reasonMissingAnnotation},
		{"VTEP MAC of another peer", []nodeOpt{withAnnotation(AnnotationVTEPMAC, testMAC(2, v4))}, reasonDuplicateMAC},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h, logs := startBadInputHarness(t)
			h.eventually("n2 routed", h.hasState("route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4"))
			without := h.k.state()

			bad := good.DeepCopy()
			for _, o := range tt.opts {
				o(bad)
			}
			if _, err := h.client.CoreV1().Nodes().Create(ctx, bad, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			skipped := h.o.m.peersSkipped.WithLabelValues(tt.reason)
			h.eventually("skip counted under "+tt.reason, func() bool { return testutil.ToFloat64(skipped) == 1 })
			h.syncs(3) // later syncs neither count nor log it again
			if got := testutil.ToFloat64(skipped); got != 1 {
				t.Errorf("knit_overlay_peers_skipped_total{reason=%q} = %v after more syncs, want 1", tt.reason, got)
			}
			if n := testutil.CollectAndCount(h.o.m.peersSkipped); n != 1 {
				t.Errorf("knit_overlay_peers_skipped_total has %d label sets, want only reason=%q", n, tt.reason)
			}
			warn := `level=WARN msg="skipping peer" peer=` + name + " "
			if n := strings.Count(logs.String(), warn); n != 1 {
				t.Errorf("%d warnings %q, want 1; log:\n%s", n, warn, logs.String())
			} else if line := lineWith(logs.String(), warn); !strings.Contains(line, "reason="+tt.reason+" ") {
				t.Errorf("warning does not name reason %s: %s", tt.reason, line)
			}
			if got := h.k.state(); got != without {
				t.Errorf("kernel changed by a skipped peer:\n%s\nwant (as without it):\n%s", got, without)
			}
			if got := testutil.ToFloat64(h.o.m.peersKnown); got != 2 {
				t.Errorf("peers known = %v, want 2", got)
			}
			if got := testutil.ToFloat64(h.o.m.peersProgrammed.WithLabelValues("vxlan")); got != 1 {
				t.Errorf("peers programmed = %v, want 1 (n2 only)", got)
			}
			if got := testutil.ToFloat64(h.o.m.errors.WithLabelValues("kernel")); got != 0 {
				t.Errorf("kernel errors = %v", got)
			}

			// Fixed: routed, and said so.
			h.updateNode(name, func(n *corev1.Node) { n.Spec, n.Annotations = good.Spec, good.Annotations })
			h.eventually("fixed peer routed", h.hasState("route 10.42.5.0/24 via 10.42.5.0 dev knit-vx4"))
			h.eventually("log says so", func() bool {
				return strings.Contains(logs.String(), `msg="peer no longer skipped" peer=`+name+"/")
			})
			if !strings.Contains(h.k.state(), "route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4") {
				t.Error("n2's route lost")
			}
		})
	}
}

// TestOverlayJoiningPeer: a Node younger than joinGrace that has no overlay
// annotation yet is a node joining (its agent has not published), not bad
// input: an info line, no warning, no count; once it publishes, it is
// routed. The same Node older than joinGrace is a skipped peer.
func TestOverlayJoiningPeer(t *testing.T) {
	tests := []struct {
		name    string
		age     time.Duration
		counted bool
	}{
		{"joining", time.Second, false},
		{"older than the grace", joinGrace + time.Minute, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h, logs := startBadInputHarness(t)
			good := knitNode("peer5", 5, []string{"10.42.5.0/24"}, []string{"198.18.0.5"})
			bare := good.DeepCopy()
			withoutAnnotations()(bare)
			bare.CreationTimestamp = metav1.NewTime(time.Now().Add(-tt.age))
			if _, err := h.client.CoreV1().Nodes().Create(ctx, bare, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			h.eventually("peer known", func() bool { return testutil.ToFloat64(h.o.m.peersKnown) == 2 })
			h.syncs(2)
			skipped := testutil.ToFloat64(h.o.m.peersSkipped.WithLabelValues(reasonMissingAnnotation))
			warned := strings.Contains(logs.String(), `level=WARN msg="skipping peer" peer=peer5 `)
			informed := strings.Contains(logs.String(), `level=INFO msg="peer not announced yet" peer=peer5 `)
			if tt.counted != (skipped == 1) || tt.counted != warned || tt.counted == informed {
				t.Fatalf("age %v: counted %v, warned %v, info %v; want counted and warned %v\n%s", tt.age, skipped, warned, informed, tt.counted, logs.String())
			}
			// Its agent publishes: routed.
			h.updateNode("peer5", func(n *corev1.Node) { n.Annotations = good.Annotations })
			h.eventually("routed once announced", h.hasState("route 10.42.5.0/24 via 10.42.5.0 dev knit-vx4"))
			if !tt.counted && strings.Contains(logs.String(), "level=WARN") {
				t.Errorf("a joining node caused a warning:\n%s", logs.String())
			}
		})
	}
}

// startBadInputHarness starts a VXLAN overlay of this node (10.42.1.0/24)
// and peer2, ready, whose log the test reads.
func startBadInputHarness(t *testing.T) (*harness, *testkit.SyncBuffer) {
	t.Helper()
	logs := &testkit.SyncBuffer{}
	h := startHarnessLog(t, testConfig(t, BackendVXLAN), newFixture().k, knftables.NewFake(knftables.InetFamily, nftTable),
		nil, slog.New(slog.NewTextHandler(logs, nil)), self("10.42.1.0/24", "198.18.0.1"), peer2)
	h.eventually("ready", h.o.Ready)
	return h, logs
}

// updateNode changes the named Node through the API.
func (h *harness) updateNode(name string, change func(*corev1.Node)) {
	h.t.Helper()
	ctx := context.Background()
	n, err := h.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		h.t.Fatal(err)
	}
	change(n)
	if _, err := h.client.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		h.t.Fatal(err)
	}
}

// syncs kicks the sync loop until it has run n more syncs.
func (h *harness) syncs(n int) {
	h.t.Helper()
	start := metricSum(h.reg, "knit_overlay_sync_duration_seconds")
	h.eventually("more syncs", func() bool {
		h.o.kick()
		return metricSum(h.reg, "knit_overlay_sync_duration_seconds") >= start+float64(n)
	})
}

func lineWith(text, s string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}
