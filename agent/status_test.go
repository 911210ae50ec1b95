package agent

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"knit.dev/knit/cluster"
	"knit.dev/knit/status"
)

type stubComponent struct {
	name  string
	ready bool
}

func (s stubComponent) Name() string                  { return s.name }
func (s stubComponent) Run(ctx context.Context) error { <-ctx.Done(); return nil }
func (s stubComponent) Ready() bool                   { return s.ready }

func testAgent() *Agent {
	client := fake.NewClientset()
	a := &Agent{
		cfg:   Config{NodeName: "node1", StatusNamespace: "knit-system", Version: "v-test"},
		log:   slog.New(slog.DiscardHandler),
		reg:   prometheus.NewRegistry(),
		conn:  &cluster.Connection{Client: client},
		sup:   newSupervisor(slog.New(slog.DiscardHandler), prometheus.NewRegistry()),
		comps: []Component{stubComponent{"proxy", true}, stubComponent{"dns", false}},
	}
	a.healthAddr.Store("198.18.0.1:9940")
	return a
}

// The status Lease is created on the first publish and updated after;
// its summary says which components are not ready.
func TestWriteLease(t *testing.T) {
	a := testAgent()
	ctx := context.Background()
	for _, state := range []string{status.StateRunning, status.StateStopped} {
		sum := status.Summarize(a.statusDoc(), state)
		if err := a.writeLease(ctx, &sum); err != nil {
			t.Fatalf("%s: %v", state, err)
		}
		l, err := a.conn.Client.CoordinationV1().Leases("knit-system").Get(ctx, "knit-node-node1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var got status.Summary
		if err := json.Unmarshal([]byte(l.Annotations[status.SummaryAnnotation]), &got); err != nil {
			t.Fatal(err)
		}
		if got.State != state || got.Node != "node1" || len(got.NotReady) != 1 || got.NotReady[0] != "dns" ||
			got.HealthAddr != "198.18.0.1:9940" || l.Labels[status.LeaseLabel] != "true" || l.Spec.RenewTime == nil ||
			*l.Spec.HolderIdentity != "node1" || *l.Spec.LeaseDurationSeconds != 180 {
			t.Errorf("%s: lease %+v summary %+v", state, l, got)
		}
	}
}

func TestStatusEndpoint(t *testing.T) {
	a := testAgent()
	srv := httptest.NewServer(a.healthMuxFor(nil))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc status.Node
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	if doc.Node != "node1" || doc.Agent != "v-test" || len(doc.Components) != 2 || !doc.Components[0].Ready || doc.Components[1].Ready {
		t.Errorf("status %+v", doc)
	}
}
