package proxy

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/knftables"
)

// countingNFT counts the transactions run against knftables' fake.
type countingNFT struct {
	*knftables.Fake
	runs atomic.Int32
}

func (c *countingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	c.runs.Add(1)
	return c.Fake.Run(ctx, tx)
}

// TestNewServiceHoldOff runs the real sync loop: a new Service without an
// EndpointSlice waits (bounded) for its slice so that both go in one
// transaction, and changes to existing Services are never held.
func TestNewServiceHoldOff(t *testing.T) {
	for _, tc := range []struct {
		name    string
		holdOff time.Duration
		// then runs after the new Service is created; it returns the
		// element that must appear, and the transactions it may take.
		then func(h *harness) (set string, key []string, maxRuns int32)
		// minWait: the element must not appear sooner (the hold-off).
		minWait time.Duration
	}{
		{"its slice follows: one transaction", 30 * time.Second, func(h *harness) (string, []string, int32) {
			time.Sleep(50 * time.Millisecond)
			h.create(slice("ns2", "new", "new-1", 8080, eps(3, "10.42.5", otherNode)))
			return "service-ips-v4", []string{"10.43.1.1", "tcp", "80"}, 1
		}, 0},
		{"no slice: synced alone when the hold-off ends", 300 * time.Millisecond, func(h *harness) (string, []string, int32) {
			return "no-endpoint-services-v4", []string{"10.43.1.1", "tcp", "80"}, 1
		}, 300 * time.Millisecond},
		{"an existing Service's endpoints are not held", 30 * time.Second, func(h *harness) (string, []string, int32) {
			h.update(slice("ns1", "web", "web-1", 8080, eps(1, "10.42.9", otherNode)))
			return "hairpin-connections-v4", nil, 1
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.NewServiceHoldOff = tc.holdOff
			nft := &countingNFT{Fake: knftables.NewFake(knftables.InetFamily, tableName)}
			h := newHarness(t, cfg, nft,
				service("ns1", "web", "10.43.0.20"),
				slice("ns1", "web", "web-1", 8080, eps(2, "10.42.1", thisNode)))
			h.fake = nft.Fake
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error)
			go func() { done <- h.p.Run(ctx) }()
			defer func() { cancel(); <-done }()
			waitFor(t, h.p.Ready, "first sync") // waitFor gives up after 10s, well before a 30s hold-off
			before := nft.runs.Load()

			start := time.Now()
			h.create(service("ns2", "new", "10.43.1.1"))
			set, key, maxRuns := tc.then(h)
			if key == nil {
				// The existing Service's change: its old local
				// endpoints leave the hairpin set.
				waitFor(t, func() bool { return !h.has(set, []string{"10.42.1.1", "10.42.1.1", "tcp", "8080"}) }, "the endpoint change")
			} else {
				waitFor(t, func() bool { return h.has(set, key) }, "the new Service")
			}
			if took := time.Since(start); took < tc.minWait {
				t.Errorf("programmed after %v, before the hold-off of %v", took, tc.minWait)
			}
			if runs := nft.runs.Load() - before; runs > maxRuns {
				t.Errorf("%d transactions, want at most %d", runs, maxRuns)
			}
		})
	}
}

// create and update write through the API without waiting for the
// proxy (the loop runs on its own here).
func (h *harness) create(obj runtime.Object) {
	h.t.Helper()
	var err error
	switch o := obj.(type) {
	case *corev1.Service:
		_, err = h.client.CoreV1().Services(o.Namespace).Create(context.Background(), o, metav1.CreateOptions{})
	case *discoveryv1.EndpointSlice:
		_, err = h.client.DiscoveryV1().EndpointSlices(o.Namespace).Create(context.Background(), o, metav1.CreateOptions{})
	}
	if err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) update(s *discoveryv1.EndpointSlice) {
	h.t.Helper()
	if _, err := h.client.DiscoveryV1().EndpointSlices(s.Namespace).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
		h.t.Fatal(err)
	}
}

// has reports whether the fake table's set or map holds key.
func (h *harness) has(container string, key []string) bool {
	h.fake.RLock()
	defer h.fake.RUnlock()
	if h.fake.Table == nil {
		return false
	}
	if s := h.fake.Table.Sets[container]; s != nil {
		return s.FindElement(key...) != nil
	}
	if m := h.fake.Table.Maps[container]; m != nil {
		return m.FindElement(key...) != nil
	}
	return false
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
