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

	if _, err := gt.RoundTrip(req); err == nil {
		t.Fatal("first request during an outage should fail (nobody knew yet)")
	}
	if !health.Down() {
		t.Fatal("a connection error must mark the server down")
	}
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := gt.RoundTrip(req)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("GET during the outage returned at once (%v); it should be held", err)
	case <-time.After(3 * probeInterval):
	}
	up.Store(true)
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
	if health.Down() {
		t.Error("server still marked down")
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
