package lb

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func testLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// agent is one controller with an informer factory of its own on the
// shared fake API, as one node's agent would have.
type agent struct {
	c      *Controller
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func startAgent(t *testing.T, client *fake.Clientset, node string, mod func(*Config)) *agent {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NodeName = node
	cfg.MinSyncInterval = 10 * time.Millisecond
	cfg.LeaseDuration, cfg.RenewDeadline, cfg.RetryPeriod = time.Second, 500*time.Millisecond, 100*time.Millisecond
	if mod != nil {
		mod(&cfg)
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	c, err := New(cfg, Sources{
		Services:       factory.Core().V1().Services(),
		EndpointSlices: factory.Discovery().V1().EndpointSlices(),
		Nodes:          factory.Core().V1().Nodes(),
		Client:         client,
	}, prometheus.NewRegistry(), testLogger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{c: c, cancel: cancel, done: make(chan error, 1)}
	factory.Start(ctx.Done())
	go func() { a.done <- c.Run(ctx) }()
	t.Cleanup(func() {
		a.stop(t)
		factory.Shutdown()
	})
	eventually(t, "informers synced", c.Ready)
	return a
}

func (a *agent) stop(t *testing.T) {
	a.once.Do(func() {
		a.cancel()
		select {
		case err := <-a.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func statusIPs(t *testing.T, client *fake.Clientset, name string) string {
	t.Helper()
	svc, err := client.CoreV1().Services("default").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, i := range svc.Status.LoadBalancer.Ingress {
		out = append(out, i.IP)
	}
	return strings.Join(out, " ")
}

func waitIPs(t *testing.T, client *fake.Clientset, name, want string) {
	t.Helper()
	eventually(t, name+" status "+want, func() bool { return statusIPs(t, client, name) == want })
}

func statusPatches(client *fake.Clientset) int {
	n := 0
	for _, a := range client.Actions() {
		if a.GetVerb() == "patch" && a.GetResource().Resource == "services" && a.GetSubresource() == "status" {
			n++
		}
	}
	return n
}

// TestServesItsClass: Services of knit's class (and, with DefaultClass,
// of none) get the Ready nodes' addresses and knit's condition; others
// are never written.
func TestServesItsClass(t *testing.T) {
	for _, tt := range []struct {
		name         string
		defaultClass bool
		served       []string
		untouched    []string
	}{
		{"class only", false, []string{"mine"}, []string{"other", "none", "cip"}},
		{"default class too", true, []string{"mine", "none"}, []string{"other", "cip"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cip := lbService("cip", "", false)
			cip.Spec.Type = corev1.ServiceTypeClusterIP
			client := fake.NewClientset(
				node("n1", "198.18.0.1"), node("n2", "198.18.0.2"), notReady(node("n3", "198.18.0.3")),
				onPort(lbService("mine", DefaultClass, false), 8001), onPort(lbService("other", "example.com/other", false), 8002),
				onPort(lbService("none", "", false), 8003), cip)
			a := startAgent(t, client, "n1", func(c *Config) { c.DefaultClass = tt.defaultClass })
			for _, name := range tt.served {
				waitIPs(t, client, name, "198.18.0.1 198.18.0.2")
				svc, _ := client.CoreV1().Services("default").Get(context.Background(), name, metav1.GetOptions{})
				cond := meta.FindStatusCondition(svc.Status.Conditions, ConditionType)
				if cond == nil || cond.Status != metav1.ConditionTrue || cond.Message != "served by knit on n1, n2" {
					t.Errorf("%s: condition %+v", name, cond)
				}
			}
			// A full pass later, the others are still untouched and nothing
			// was written twice.
			writes := statusPatches(client)
			a.c.trigger()
			time.Sleep(200 * time.Millisecond)
			for _, name := range tt.untouched {
				svc, _ := client.CoreV1().Services("default").Get(context.Background(), name, metav1.GetOptions{})
				if len(svc.Status.LoadBalancer.Ingress) != 0 || len(svc.Status.Conditions) != 0 {
					t.Errorf("%s was written: %+v", name, svc.Status)
				}
			}
			if got := statusPatches(client); got != writes || writes != len(tt.served) {
				t.Errorf("%d status patches, then %d after a full pass; want %d and no more", writes, got, len(tt.served))
			}
			lease, err := client.CoordinationV1().Leases(DefaultLeaseNamespace).Get(context.Background(), DefaultLeaseName, metav1.GetOptions{})
			if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != "n1" {
				t.Errorf("lease %+v, %v; want held by n1", lease, err)
			}
		})
	}
}

// TestFollowsNodesAndEndpoints: the addresses follow node readiness and,
// for externalTrafficPolicy Local, the nodes holding ready endpoints.
func TestFollowsNodesAndEndpoints(t *testing.T) {
	ctx := context.Background()
	eps := slice("local", "local-1", "n1")
	client := fake.NewClientset(
		node("n1", "198.18.0.1"), node("n2", "198.18.0.2"),
		onPort(lbService("local", DefaultClass, true), 8001), onPort(lbService("cluster", DefaultClass, false), 8002), eps)
	startAgent(t, client, "n1", nil)
	waitIPs(t, client, "local", "198.18.0.1")
	waitIPs(t, client, "cluster", "198.18.0.1 198.18.0.2")

	steps := []struct {
		name                string
		do                  func() error
		wantLocal, wantClus string
	}{
		{"endpoint moves to n2", func() error {
			_, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx, slice("local", "local-1", "n2"), metav1.UpdateOptions{})
			return err
		}, "198.18.0.2", "198.18.0.1 198.18.0.2"},
		{"n3 joins", func() error {
			_, err := client.CoreV1().Nodes().Create(ctx, node("n3", "198.18.0.3"), metav1.CreateOptions{})
			return err
		}, "198.18.0.2", "198.18.0.1 198.18.0.2 198.18.0.3"},
		{"endpoint on n2 terminating, a new one on n3", func() error {
			_, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx, slice("local", "local-1", "n2=false", "n3"), metav1.UpdateOptions{})
			return err
		}, "198.18.0.3", "198.18.0.1 198.18.0.2 198.18.0.3"},
		{"n3 not ready", func() error {
			_, err := client.CoreV1().Nodes().Update(ctx, notReady(node("n3", "198.18.0.3")), metav1.UpdateOptions{})
			return err
		}, "", "198.18.0.1 198.18.0.2"},
		{"n2 deleted", func() error {
			return client.CoreV1().Nodes().Delete(ctx, "n2", metav1.DeleteOptions{})
		}, "", "198.18.0.1"},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		waitIPs(t, client, "local", s.wantLocal)
		waitIPs(t, client, "cluster", s.wantClus)
	}
	svc, _ := client.CoreV1().Services("default").Get(ctx, "local", metav1.GetOptions{})
	if c := meta.FindStatusCondition(svc.Status.Conditions, ConditionType); c == nil || c.Status != metav1.ConditionFalse || c.Reason != ReasonNoNodes {
		t.Errorf("Local Service without ready endpoints: condition %+v", c)
	}
}

// TestLeavesClass: a Service that stops being knit's loses the node
// addresses and the condition knit wrote, and keeps what another load
// balancer wrote.
func TestLeavesClass(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(node("n1", "198.18.0.1"), lbService("s", DefaultClass, false))
	startAgent(t, client, "n1", nil)
	waitIPs(t, client, "s", "198.18.0.1")

	svc, err := client.CoreV1().Services("default").Get(ctx, "s", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Spec.LoadBalancerClass = new("example.com/other")
	svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: "203.0.113.9"})
	if _, err := client.CoreV1().Services("default").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitIPs(t, client, "s", "203.0.113.9")
	eventually(t, "condition removed", func() bool {
		svc, _ := client.CoreV1().Services("default").Get(ctx, "s", metav1.GetOptions{})
		return meta.FindStatusCondition(svc.Status.Conditions, ConditionType) == nil
	})
}

// TestOneWriterHandsOver: of two agents only the Lease holder writes;
// when it stops, the other takes over and writes.
func TestOneWriterHandsOver(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(node("n1", "198.18.0.1"), node("n2", "198.18.0.2"), lbService("a", DefaultClass, false))
	a1 := startAgent(t, client, "n1", nil)
	waitIPs(t, client, "a", "198.18.0.1 198.18.0.2")
	a2 := startAgent(t, client, "n2", nil)
	time.Sleep(300 * time.Millisecond)
	if !a1.c.Leading() || a2.c.Leading() {
		t.Fatalf("leading: n1 %v, n2 %v; want n1 only", a1.c.Leading(), a2.c.Leading())
	}
	a1.stop(t) // releases the Lease
	eventually(t, "n2 leads", a2.c.Leading)
	if a1.c.Leading() {
		t.Error("n1 still leads after it stopped")
	}
	if _, err := client.CoreV1().Services("default").Create(ctx, onPort(lbService("b", DefaultClass, false), 8001), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitIPs(t, client, "b", "198.18.0.1 198.18.0.2")
	lease, err := client.CoordinationV1().Leases(DefaultLeaseNamespace).Get(ctx, DefaultLeaseName, metav1.GetOptions{})
	if err != nil || *lease.Spec.HolderIdentity != "n2" {
		t.Errorf("lease holder %v (%v), want n2", lease.Spec.HolderIdentity, err)
	}
}

// TestPortConflict: two Services on one port: the older one gets the node
// addresses, the newer one none (reason PortConflict) until the older one
// goes; a Service on another port is not affected.
func TestPortConflict(t *testing.T) {
	ctx := context.Background()
	older := lbService("older", DefaultClass, false)
	older.CreationTimestamp = metav1.NewTime(time.Now().Add(-time.Hour))
	newer := lbService("newer", DefaultClass, false)
	newer.CreationTimestamp = metav1.NewTime(time.Now())
	client := fake.NewClientset(node("n1", "198.18.0.1"), node("n2", "198.18.0.2"),
		newer, older, onPort(lbService("elsewhere", DefaultClass, false), 9999))
	startAgent(t, client, "n1", nil)
	waitIPs(t, client, "older", "198.18.0.1 198.18.0.2")
	waitIPs(t, client, "elsewhere", "198.18.0.1 198.18.0.2")
	eventually(t, "newer: PortConflict", func() bool {
		svc, _ := client.CoreV1().Services("default").Get(ctx, "newer", metav1.GetOptions{})
		c := meta.FindStatusCondition(svc.Status.Conditions, ConditionType)
		return c != nil && c.Reason == ReasonPortConflict && len(svc.Status.LoadBalancer.Ingress) == 0
	})
	if err := client.CoreV1().Services("default").Delete(ctx, "older", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitIPs(t, client, "newer", "198.18.0.1 198.18.0.2")
}

// TestWriteFailureRetried: a failed status patch is retried.
func TestWriteFailureRetried(t *testing.T) {
	client := fake.NewClientset(node("n1", "198.18.0.1"), lbService("s", DefaultClass, false))
	failures := 1
	client.PrependReactor("patch", "services", func(action k8stesting.Action) (bool, runtime.Object, error) {
		if failures > 0 {
			failures--
			return true, nil, errors.New("injected failure")
		}
		return false, nil, nil
	})
	a := startAgent(t, client, "n1", nil)
	waitIPs(t, client, "s", "198.18.0.1")
	eventually(t, "error counted", func() bool { return testutil.ToFloat64(a.c.m.errors) == 1 })
}

func TestConfigErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"empty class", func(c *Config) { c.Class = "" }, "class must not be empty"},
		{"negative max", func(c *Config) { c.MaxNodes = -1 }, "negative"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tt.mod(&cfg)
			_, err := New(cfg, Sources{}, prometheus.NewRegistry(), testLogger())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New: %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
