package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type fakeComponent struct {
	name  string
	runs  atomic.Int64
	run   func(ctx context.Context, n int64) error
	ready atomic.Bool
}

func (f *fakeComponent) Name() string { return f.name }
func (f *fakeComponent) Ready() bool  { return f.ready.Load() }
func (f *fakeComponent) Run(ctx context.Context) error {
	return f.run(ctx, f.runs.Add(1))
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestSupervisorRestartsAndIsolates: a component that fails or panics is
// restarted, and never takes the others down.
func TestSupervisorRestartsAndIsolates(t *testing.T) {
	sup := newSupervisor(quietLog(), prometheus.NewRegistry())
	failing := &fakeComponent{name: "failing", run: func(ctx context.Context, n int64) error {
		if n == 1 {
			return errors.New("boom")
		}
		if n == 2 {
			panic("bad object")
		}
		<-ctx.Done()
		return nil
	}}
	steady := &fakeComponent{name: "steady", run: func(ctx context.Context, n int64) error {
		<-ctx.Done()
		return nil
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sup.run(ctx, []Component{failing, steady}); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for failing.runs.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if failing.runs.Load() < 3 {
		t.Fatalf("failing component ran %d times, want restarts after an error and a panic", failing.runs.Load())
	}
	if steady.runs.Load() != 1 {
		t.Errorf("steady component ran %d times, want 1 (not disturbed)", steady.runs.Load())
	}
	if !strings.Contains(sup.lastError("failing"), "panic: bad object") {
		t.Errorf("last error = %q", sup.lastError("failing"))
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("supervisor did not stop after cancel")
	}
}

func TestReadyz(t *testing.T) {
	a := &Agent{reg: prometheus.NewRegistry(), log: quietLog()}
	a.sup = newSupervisor(a.log, a.reg)
	c1 := &fakeComponent{name: "proxy"}
	c2 := &fakeComponent{name: "dns"}
	a.comps = []Component{c1, c2}
	srv := httptest.NewServer(a.healthMux())
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	c1.ready.Store(true)
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "dns") || strings.Contains(body, "proxy") {
		t.Errorf("/readyz with dns unready = %d %q", code, body)
	}
	c2.ready.Store(true)
	if code, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz all ready = %d", code)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, `knit_component_ready{component="dns"} 1`) {
		t.Errorf("/metrics = %d, lacks knit_component_ready:\n%s", code, body)
	}
}
