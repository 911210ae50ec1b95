package cluster

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"
)

type fakeRT struct {
	up    *atomic.Bool
	calls atomic.Int64
}

func (f *fakeRT) RoundTrip(*http.Request) (*http.Response, error) {
	f.calls.Add(1)
	if !f.up.Load() {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	}
	return &http.Response{StatusCode: 200, Body: http.NoBody}, nil
}

// TestGateHoldsListsDuringOutage checks the health gate: after a connection
// failure, GETs wait (instead of failing and feeding client-go's backoff)
// until the probe sees the server again, then go through at once.
func TestGateHoldsListsDuringOutage(t *testing.T) {
	var up atomic.Bool
	rt := &fakeRT{up: &up}
	health := newAPIHealth(func(context.Context) error {
		if up.Load() {
			return nil
		}
		return errors.New("down")
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	gt := &gatedTransport{next: rt, health: health}
	req, _ := http.NewRequest(http.MethodGet, "https://api/api/v1/services", nil)

	// The first GET finds the server gone: it marks it down and is held
	// too (sent again after recovery), like every GET after it.
	done := make(chan error, 2)
	start := time.Now()
	for range 2 {
		go func() {
			_, err := gt.RoundTrip(req)
			done <- err
		}()
		time.Sleep(50 * time.Millisecond)
	}
	if !health.Down() {
		t.Fatal("a connection error must mark the server down")
	}
	select {
	case err := <-done:
		t.Fatalf("GET during the outage returned (%v); it should be held", err)
	case <-time.After(3 * probeInterval):
	}
	up.Store(true)
	for range 2 {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("held GET failed after recovery: %v", err)
			}
			if waited := time.Since(start); waited > 3*probeInterval+2*time.Second {
				t.Errorf("held GET took %v after recovery", waited)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("held GET not released after the server came back")
		}
	}
	if health.Down() {
		t.Error("server still marked down")
	}
	if n := rt.calls.Load(); n != 3 {
		t.Errorf("%d round trips, want 3 (the failed first, then each GET once)", n)
	}
}

// TestGateFirstGetGivesUpWithItsContext: the GET that found the server
// gone is held only as long as its own context allows.
func TestGateFirstGetGivesUpWithItsContext(t *testing.T) {
	var up atomic.Bool
	rt := &fakeRT{up: &up}
	health := newAPIHealth(func(context.Context) error { return errors.New("down") }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	gt := &gatedTransport{next: rt, health: health}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://api/api/v1/services", nil)
	start := time.Now()
	if _, err := gt.RoundTrip(req); err == nil {
		t.Fatal("a GET whose context ended during the outage succeeded")
	}
	if took := time.Since(start); took < 250*time.Millisecond || took > 2*time.Second {
		t.Errorf("returned after %v, want when its context ended (300 ms)", took)
	}
	if n := rt.calls.Load(); n != 1 {
		t.Errorf("%d round trips, want 1", n)
	}
}

func TestGateDoesNotHoldWrites(t *testing.T) {
	var up atomic.Bool
	rt := &fakeRT{up: &up}
	health := newAPIHealth(func(context.Context) error { return errors.New("down") }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	health.markDown(errors.New("test"))
	gt := &gatedTransport{next: rt, health: health}
	req, _ := http.NewRequest(http.MethodPatch, "https://api/api/v1/nodes/n1", nil)
	start := time.Now()
	if _, err := gt.RoundTrip(req); err == nil {
		t.Fatal("want the write's own error")
	}
	if time.Since(start) > time.Second {
		t.Error("a write was held by the gate")
	}
}

func TestIsConnError(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "dial", Err: errors.New("refused")}, true},
		{context.Canceled, false},
		{context.DeadlineExceeded, true},
		{errors.New("http2: something"), false},
	} {
		if got := isConnError(tt.err); got != tt.want {
			t.Errorf("isConnError(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
