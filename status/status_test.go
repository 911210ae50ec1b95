package status

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestSummarizeIsStableAndCompact(t *testing.T) {
	t0 := time.Date(2026, 12, 4, 21, 0, 10, 0, time.UTC)
	doc := func(proxySync time.Time) *Node {
		return &Node{Node: "n1", Agent: "v1", Time: proxySync, Started: t0, HealthAddr: "127.0.0.1:9940",
			Components: []Component{{Name: "overlay", Ready: true}, {Name: "proxy", Ready: true}},
			Overlay: &Overlay{Backend: "vxlan", PeersKnown: 2, PodMTU: 1450, UnderlayMTU: 1500, PodCIDRs: []string{"10.42.0.0/24"},
				Peers: []Peer{{Node: "n2", Via: "vxlan"}, {Node: "n3", Skipped: "missing-annotation"}}},
			Proxy: &Proxy{Sync: Sync{LastSync: proxySync}, Services: 3, Endpoints: 5},
		}
	}
	a := Summarize(doc(t0), StateRunning)
	b := Summarize(doc(t0.Add(20*time.Second)), StateRunning)
	if !reflect.DeepEqual(a, b) {
		t.Errorf("syncs within the same minute changed the summary (an API write each):\n%+v\n%+v", a, b)
	}
	want := Summary{Version: Version, Node: "n1", Agent: "v1", State: StateRunning, Started: t0, HealthAddr: "127.0.0.1:9940",
		Components: []string{"overlay", "proxy"}, PodCIDRs: []string{"10.42.0.0/24"}, Backend: "vxlan", PeersKnown: 2, PeersRouted: 1,
		UnderlayMTU: 1500, PodMTU: 1450, Services: 3, Endpoints: 5, ProxySync: t0.Truncate(time.Minute)}
	if !reflect.DeepEqual(a, want) {
		t.Errorf("summary\n got %+v\nwant %+v", a, want)
	}
}

func TestProblems(t *testing.T) {
	tests := []struct {
		name string
		doc  Node
		want []string
	}{
		{"healthy", Node{Components: []Component{{Name: "proxy", Ready: true}}, Proxy: &Proxy{}}, nil},
		{"not ready with last error", Node{Components: []Component{{Name: "dns", LastError: "bind: address in use"}}},
			[]string{"dns is not ready (last error: bind: address in use)"}},
		{"sync failing", Node{Components: []Component{{Name: "proxy", Ready: true}}, Proxy: &Proxy{Sync: Sync{LastError: "nft: boom"}}},
			[]string{"proxy: last sync failed at 0001-01-01T00:00:00Z: nft: boom"}},
		{"peer skipped", Node{Overlay: &Overlay{Peers: []Peer{{Node: "n2", Skipped: "no-podcidr"}}}},
			[]string{"overlay: peers without routes: n2 (no-podcidr)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.doc.Problems(); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Problems() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestSyncRecorder(t *testing.T) {
	var r SyncRecorder
	r.Record(errors.New("boom"))
	if s := r.Get(); s.LastError != "boom" || s.LastFailure.IsZero() || !s.LastSync.IsZero() {
		t.Errorf("after a failure: %+v", s)
	}
	r.Record(nil)
	if s := r.Get(); s.LastError != "" || s.LastSync.IsZero() || s.LastFailure.IsZero() || !s.Healthy() {
		t.Errorf("after a success: %+v", s)
	}
	if !strings.HasPrefix(LeaseName("node1"), LeasePrefix) {
		t.Error("LeaseName")
	}
}

func TestSameState(t *testing.T) {
	base := Summary{Node: "n1", State: StateRunning, Services: 3, PeersKnown: 2, PodMTU: 1450}
	tests := []struct {
		name string
		mod  func(*Summary)
		same bool
	}{
		{"identical", func(*Summary) {}, true},
		{"a Service more somewhere", func(s *Summary) { s.Services, s.Endpoints = 4, 9 }, true},
		{"a node more", func(s *Summary) { s.PeersKnown, s.PeersRouted = 3, 3 }, true},
		{"proxy synced a minute later", func(s *Summary) { s.ProxySync = time.Unix(60, 0) }, true},
		{"a component not ready", func(s *Summary) { s.NotReady = []string{"dns"} }, false},
		{"a sync error", func(s *Summary) { s.Errors = []string{"proxy: boom"} }, false},
		{"stopped", func(s *Summary) { s.State = StateStopped }, false},
		{"MTU changed", func(s *Summary) { s.PodMTU = 1350 }, false},
	}
	for _, tt := range tests {
		o := base
		tt.mod(&o)
		if got := base.SameState(o); got != tt.same {
			t.Errorf("%s: SameState = %v, want %v", tt.name, got, tt.same)
		}
	}
}
