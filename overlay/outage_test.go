package overlay

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// An agent (re)started while the API server is unreachable has no Node
// cache to render from: it must leave the kernel exactly as the previous
// agent left it (routes stay), and sync, changing nothing, once the server
// answers.
func TestOverlayStartsWhileAPIServerDown(t *testing.T) {
	cfg := testConfig(t, BackendVXLAN)
	nodes := []*corev1.Node{self("10.42.1.0/24", "198.18.0.1"), peer2, peer3}
	first := startHarness(t, cfg, nodes...)
	first.eventually("ready", first.o.Ready)
	first.stop()
	before := first.k.state()
	first.k.takeCalls()
	last := first.nft.LastTransaction

	var down atomic.Bool
	down.Store(true)
	unreachable := func(c *fake.Clientset) {
		for _, verb := range []string{"list", "get", "patch"} {
			c.PrependReactor(verb, "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
				if down.Load() {
					return true, nil, errors.New("dial tcp 198.18.0.254:6443: connect: connection refused")
				}
				return false, nil, nil
			})
		}
		c.PrependWatchReactor("nodes", func(k8stesting.Action) (bool, watch.Interface, error) {
			if down.Load() {
				return true, nil, errors.New("connection refused")
			}
			return false, nil, nil
		})
	}
	second := startHarnessWith(t, cfg, first.k, first.nft, unreachable, nodes...)
	time.Sleep(1500 * time.Millisecond) // the informer's lists fail and are retried meanwhile
	if second.o.Ready() {
		t.Fatal("Ready without a Node cache")
	}
	if calls := first.k.takeCalls(); len(calls) != 0 {
		t.Errorf("changed the kernel with the API server down:\n%s", lines(calls...))
	}
	if got := first.k.state(); got != before {
		t.Errorf("kernel state changed with the API server down:\n%s\nwant:\n%s", got, before)
	}

	down.Store(false)
	second.eventually("ready once the server answers", second.o.Ready)
	if calls := first.k.takeCalls(); len(calls) != 0 {
		t.Errorf("the first sync after the outage changed the kernel:\n%s", lines(calls...))
	}
	if first.nft.LastTransaction != last {
		t.Error("the first sync after the outage rewrote the nftables table")
	}
}
