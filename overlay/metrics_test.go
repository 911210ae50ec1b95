package overlay

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/knftables"
)

// The metrics (peers known, peers programmed, sync duration,
// errors) under their exported names, and that each moves when what it
// counts happens.
func TestOverlayMetricsMove(t *testing.T) {
	tests := []struct {
		name  string
		self  *corev1.Node
		check func(t *testing.T, h *harness)
	}{{
		name: "peers known and programmed follow Nodes coming and going",
		self: self("10.42.1.0/24", "198.18.0.1"),
		check: func(t *testing.T, h *harness) {
			ctx := context.Background()
			h.eventually("two peers", func() bool {
				return gathered(h, "knit_overlay_peers_known") == 2 && gathered(h, `knit_overlay_peers_programmed{backend="vxlan"}`) == 2
			})
			mustDo(t, h.client.CoreV1().Nodes().Delete(ctx, "n3", metav1.DeleteOptions{}))
			h.eventually("one peer", func() bool {
				return gathered(h, "knit_overlay_peers_known") == 1 && gathered(h, `knit_overlay_peers_programmed{backend="vxlan"}`) == 1
			})
			// Known but not programmed: a peer without knit's annotations.
			_, err := h.client.CoreV1().Nodes().Create(ctx, knitNode("n4", 4, []string{"10.42.4.0/24"}, nil), metav1.CreateOptions{})
			mustDo(t, err)
			h.eventually("known, not programmed", func() bool {
				return gathered(h, "knit_overlay_peers_known") == 2 && gathered(h, `knit_overlay_peers_programmed{backend="vxlan"}`) == 1
			})
		},
	}, {
		name: "sync duration observes every sync",
		self: self("10.42.1.0/24", "198.18.0.1"),
		check: func(t *testing.T, h *harness) {
			before := gathered(h, "knit_overlay_sync_duration_seconds_count")
			if before < 1 {
				t.Fatalf("no sync observed after Ready (count %v)", before)
			}
			h.syncs(2)
			if sum := gathered(h, "knit_overlay_sync_duration_seconds_sum"); sum <= 0 {
				t.Errorf("sync duration sum %v", sum)
			}
		},
	}, {
		name: "a kernel failure is counted under stage kernel, and the sync retried until it works",
		self: self("10.42.1.0/24", "198.18.0.1"),
		check: func(t *testing.T, h *harness) {
			h.k.mu.Lock()
			h.k.interrupt = 3 // the next three route dumps fail
			h.k.mu.Unlock()
			deleteRoute(t, h.k, "10.42.2.0/24")
			h.o.kick()
			h.eventually("errors counted", func() bool { return gathered(h, `knit_overlay_errors_total{stage="kernel"}`) >= 1 })
			h.eventually("route back after the retries", h.hasState("route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4"))
		},
	}, {
		name: "a node IP on no interface is counted under stage underlay",
		self: self("10.42.1.0/24", "198.18.0.99"),
		check: func(t *testing.T, h *harness) {
			h.eventually("errors counted", func() bool { return gathered(h, `knit_overlay_errors_total{stage="underlay"}`) >= 2 })
			if h.o.Ready() || strings.Contains(h.k.state(), deviceV4) {
				t.Errorf("acted without an underlay; kernel:\n%s", h.k.state())
			}
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := startHarnessWith(t, testConfig(t, BackendVXLAN), newFixture().k,
				knftables.NewFake(knftables.InetFamily, nftTable), nil, tt.self, peer2, peer3)
			if tt.self.Status.Addresses[0].Address == "198.18.0.1" {
				h.eventually("ready", h.o.Ready)
			}
			tt.check(t, h)
		})
	}
}

// gathered is the value of one sample in the harness's registry, named as
// in the exposition format: name{label="value",...}; -1 if absent.
func gathered(h *harness, sample string) float64 {
	mfs, err := h.reg.Gather()
	if err != nil {
		return -1
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+`="`+l.GetValue()+`"`)
			}
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetCounter() != nil && name == sample:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil && name == sample:
				return m.GetGauge().GetValue()
			case m.GetHistogram() != nil && name+"_count" == sample:
				return float64(m.GetHistogram().GetSampleCount())
			case m.GetHistogram() != nil && name+"_sum" == sample:
				return m.GetHistogram().GetSampleSum()
			}
		}
	}
	return -1
}

// The timer alone repairs: with no Node event and no kernel event (the fake
// kernel reports no deletions), a route someone deleted is back after one
// SyncPeriod.
func TestOverlayTimerResync(t *testing.T) {
	cfg := testConfig(t, BackendVXLAN)
	cfg.SyncPeriod = 300 * time.Millisecond
	h := startHarness(t, cfg, self("10.42.1.0/24", "198.18.0.1"), peer2)
	h.eventually("ready", h.o.Ready)
	if _, ok := any(h.k).(kernelWatcher); ok {
		t.Fatal("the fake kernel reports deletions: this would not test the timer")
	}
	// Publishing this node's annotations is a Node event (a sync): let it
	// pass first.
	h.eventually("annotations", func() bool {
		n, err := h.client.CoreV1().Nodes().Get(context.Background(), "n1", metav1.GetOptions{})
		return err == nil && n.Annotations[AnnotationVTEPMAC] == ownMAC
	})
	h.syncs(1)
	time.Sleep(300 * time.Millisecond) // a kick syncs left pending is spent
	deleteRoute(t, h.k, "10.42.2.0/24")
	h.eventually("route restored by the timer", h.hasState("route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4"))
}

// A configured VNI and port reach the device and the masquerade's
// exception for VXLAN packets.
func TestConfiguredVNIAndPort(t *testing.T) {
	for _, tt := range []struct {
		vni, port  int
		link, rule string
	}{
		{0, 0, "vxlan vni 1 port 8472 ", "udp dport 8472 fib saddr type local return"},
		{42, 4789, "vxlan vni 42 port 4789 ", "udp dport 4789 fib saddr type local return"},
	} {
		cfg := testConfig(t, BackendVXLAN)
		cfg.VNI, cfg.Port = tt.vni, tt.port
		cfg, err := cfg.normalize()
		mustDo(t, err)
		h := startHarness(t, cfg, self("10.42.1.0/24", "198.18.0.1"), peer2)
		h.eventually("ready", h.o.Ready)
		if !strings.Contains(h.k.state(), "link knit-vx4 mtu 1450 "+tt.link) {
			t.Errorf("VNI %d port %d: device is not %q:\n%s", tt.vni, tt.port, tt.link, h.k.state())
		}
		if !strings.Contains(h.nft.Dump(), tt.rule) {
			t.Errorf("VNI %d port %d: no %q:\n%s", tt.vni, tt.port, tt.rule, h.nft.Dump())
		}
		h.stop()
	}
}
