package doctor

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"knit.dev/knit/status"
)

func TestStatusView(t *testing.T) {
	tests := []struct {
		name  string
		mod   func(w *world)
		check func(t *testing.T, v *ClusterView, table string)
	}{
		{
			name: "healthy, agents reachable",
			mod:  func(*world) {},
			check: func(t *testing.T, v *ClusterView, table string) {
				for _, n := range v.Nodes {
					if n.Detail == nil || n.Agent != status.StateRunning {
						t.Errorf("%s: agent %s, detail %v", n.Name, n.Agent, n.Detail)
					}
				}
				if v.Services != 1 || v.ReadyEndpoints != 1 {
					t.Errorf("services %d, ready endpoints %d", v.Services, v.ReadyEndpoints)
				}
				for _, want := range []string{"NODE", "node1", "198.18.0.1", "10.42.0.0/24", "running", "20s ago", "vxlan 0/0", "1450/1500", "last sync"} {
					if !strings.Contains(table, want) {
						t.Errorf("table lacks %q", want)
					}
				}
			},
		},
		{
			name: "stopped agent and one behind loopback",
			mod: func(w *world) {
				w.leases["node2"].State = status.StateStopped
				delete(w.agents.statuses, "node2")
				w.leases["node3"].HealthAddr = "127.0.0.1:9940"
				w.leases["node3"].NotReady = []string{"proxy"}
			},
			check: func(t *testing.T, v *ClusterView, table string) {
				n2, n3 := v.Nodes[1], v.Nodes[2]
				if n2.Agent != status.StateStopped || n2.Detail != nil || n2.DetailError == "" {
					t.Errorf("node2: %+v", n2)
				}
				if n3.Detail != nil || !strings.Contains(n3.Unreachable, "127.0.0.1:9940") {
					t.Errorf("node3: %+v", n3)
				}
				for _, want := range []string{"agent stopped", "proxy not ready", "no detail: its agent listens on 127.0.0.1:9940 only"} {
					if !strings.Contains(table, want) {
						t.Errorf("table lacks %q:\n%s", want, table)
					}
				}
			},
		},
		{
			name: "native nftables forward drop on a node",
			mod: func(w *world) {
				w.agents.statuses["node2"].Overlay.ForwardBlocked = []string{"inet filter forward"}
			},
			check: func(t *testing.T, v *ClusterView, table string) {
				if !strings.Contains(table, "nftables forward chain(s) with policy drop: inet filter forward") {
					t.Errorf("table lacks the forward drop:\n%s", table)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := healthyWorld()
			tt.mod(w)
			v, err := Status(context.Background(), w.env())
			if err != nil {
				t.Fatal(err)
			}
			var b bytes.Buffer
			v.WriteTable(&b)
			tt.check(t, v, b.String())
		})
	}
}
