package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/overlay"
)

// TestOverlayBadPeer: Node objects with bad overlay input (a podCIDR outside
// the cluster CIDR, a malformed annotation, an address of the wrong family)
// are skipped by
// every node's real agent with a warning in its log naming the peer and
// the reason, and one count of knit_overlay_peers_skipped_total{reason} on
// its /metrics; no route or FDB entry appears for them, pods keep reaching
// each other across nodes, and no agent restarts. (A podCIDR overlapping a
// node's own is covered by the overlay's unit tests: here it would also cut
// that node off from the others while it lasts, by design.)
func TestOverlayBadPeer(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	ns := namespace(t, c, "overlay-badpeer")
	pods := echoPods(t, c, ns, "bp", c.Nodes[0].Name, c.Nodes[1].Name)
	pids := agentPIDs(c)
	const podCIDR, ip, mac = "10.42.251.0/24", "198.18.0.251", "02:00:00:00:fb:04"
	tests := []struct {
		name   string
		mutate func(*corev1.Node)
		reason string
	}{
		// (No podCIDR at all is the unit tests': kube-controller-manager
		// would give the Node one at once.)
		{"outside", func(n *corev1.Node) { n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.99.251.0/24", []string{"10.99.251.0/24"} }, "outside-cluster-cidr"},
		{"bad-mac", func(n *corev1.Node) { n.Annotations[overlay.AnnotationVTEPMAC] = "zz:zz:zz" }, "malformed-annotation"},
		{"v6-in-v4-key", func(n *corev1.Node) { n.Annotations[overlay.AnnotationPublicIP] = "fd00::fb" }, "wrong-family"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := phantomPeer("bad-"+tt.name, podCIDR, ip, mac)
			want := `level=WARN msg="skipping peer" component=overlay peer=` + bad.Name + " "
			before := map[string]float64{}
			logged := map[string]int{} // the log may hold an earlier run's
			for _, n := range c.Nodes {
				before[n.Name] = skippedMetric(t, n, tt.reason)
				logged[n.Name] = countInFile(agentLog(n), want)
			}
			tt.mutate(bad)
			if _, err := c.Client.CoreV1().Nodes().Create(ctx, bad, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := c.Client.CoreV1().Nodes().Delete(context.Background(), bad.Name, metav1.DeleteOptions{}); err != nil {
					t.Error(err)
				}
			}()
			for _, n := range c.Nodes {
				if err := eventually(5*time.Second, func() error {
					if got := skippedMetric(t, n, tt.reason); got != before[n.Name]+1 {
						return fmt.Errorf("knit_overlay_peers_skipped_total{reason=%q} %v -> %v", tt.reason, before[n.Name], got)
					}
					return nil
				}); err != nil {
					t.Errorf("%s: %v", n.Name, err)
				}
				log := agentLog(n)
				if got := countInFile(log, want) - logged[n.Name]; got != 1 {
					t.Errorf("%s: %d new warnings %q in %s, want 1", n.Name, got, want, log)
				} else if line := lineIn(log, want); !strings.Contains(line, "reason="+tt.reason+" ") {
					t.Errorf("%s: the warning does not name reason %s: %s", n.Name, tt.reason, line)
				}
				if err := peerEntries(ctx, n, bad.Spec.PodCIDR, ip, mac, false); err != nil {
					t.Errorf("%s: entries for a skipped peer: %v", n.Name, err)
				}
			}
			if r, err := httpEcho(lab.PodNetns(pods[0]), hostport(pods[1].Status.PodIP, echo.HTTPPort)); err != nil || r.Pod != pods[1].Name {
				t.Errorf("pod to pod across nodes with a bad peer present: %+v, %v", r, err)
			}
		})
	}
	if now := agentPIDs(c); fmt.Sprint(now) != fmt.Sprint(pids) {
		t.Errorf("agent PIDs changed: %v -> %v", pids, now)
	}
}

// lineIn is the first line of the file containing s.
func lineIn(path, s string) string {
	b, _ := os.ReadFile(path)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}

// skippedMetric is knit_overlay_peers_skipped_total{reason} on the node's
// agent (0 before its first count: the sample does not exist yet).
func skippedMetric(t *testing.T, n *lab.Node, reason string) float64 {
	t.Helper()
	prefix := `knit_overlay_peers_skipped_total{reason="` + reason + `"} `
	for _, l := range strings.Split(agentMetrics(t, n), "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %q: %v", n.Name, l, err)
			}
			return f
		}
	}
	return 0
}
