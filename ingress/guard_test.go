package ingress

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/knftables"
)

// guardGolden is the whole guard table for ports 80 and 443, as a serving
// ingress leaves it.
const guardGolden = `add table inet knit-ingress { comment "knit ingress: new connections wait, rather than fail, while the ingress restarts" ; }
add chain inet knit-ingress input { type filter hook input priority -10 ; }
add set inet knit-ingress draining { type inet_service ; flags timeout ; timeout 60s ; comment "ingress ports whose listener is closing" ; }
add set inet knit-ingress listening { type inet_service ; flags timeout ; timeout 600s ; comment "ingress ports, refreshed while the ingress runs" ; }
add rule inet knit-ingress input tcp flags & (fin | syn | rst | ack) == syn tcp dport @draining drop comment "listener closing: the SYN retry finds the next one"
add rule inet knit-ingress input tcp flags & (fin | syn | rst | ack) == syn tcp dport @listening socket transparent 0 accept
add rule inet knit-ingress input tcp flags & (fin | syn | rst | ack) == syn tcp dport @listening socket transparent 1 accept
add rule inet knit-ingress input tcp flags & (fin | syn | rst | ack) == syn tcp dport @listening drop comment "no listener: the ingress is restarting"
add element inet knit-ingress listening { 80 }
add element inet knit-ingress listening { 443 }
`

// noSocketNFT is a kernel without the nftables socket expression.
type noSocketNFT struct{ *knftables.Fake }

func (n noSocketNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	if strings.Contains(tx.String(), " socket ") {
		return errors.New("Error: Could not process rule: No such file or directory")
	}
	return n.Fake.Run(ctx, tx)
}

func setElements(t *testing.T, nft knftables.Interface, set string) []string {
	t.Helper()
	elems, err := nft.ListElements(context.Background(), "set", set)
	if err != nil {
		t.Fatalf("list %s: %v", set, err)
	}
	var out []string
	for _, e := range elems {
		out = append(out, strings.Join(e.Key, "."))
	}
	slices.Sort(out)
	return out
}

// TestGuard walks the guard through an ingress's life: serving, draining
// at shutdown, refreshed while serving, and cleared by the next ingress.
func TestGuard(t *testing.T) {
	ctx := context.Background()
	ports := []net.Addr{&net.TCPAddr{Port: 80}, &net.TCPAddr{Port: 443}}
	type step struct {
		name          string
		do            func(g *guard) error
		wantListening []string
		wantDraining  []string
	}
	serving := step{"serving", func(g *guard) error { return g.serving(ctx, true) }, []string{"443", "80"}, nil}
	draining := step{"draining", func(g *guard) error { return g.draining(ctx) }, []string{"443", "80"}, []string{"443", "80"}}
	refresh := step{"refresh keeps draining", func(g *guard) error { return g.serving(ctx, false) }, []string{"443", "80"}, []string{"443", "80"}}
	for _, tc := range []struct {
		name       string
		nft        func() knftables.Interface
		addrs      []net.Addr
		steps      []step
		wantSocket bool
		wantRules  int
		golden     string
	}{
		{
			name:       "restart",
			nft:        func() knftables.Interface { return knftables.NewFake(knftables.InetFamily, guardTable) },
			addrs:      ports,
			steps:      []step{serving, draining, refresh, serving},
			wantSocket: true, wantRules: 4, golden: guardGolden,
		},
		{
			name:       "kernel without the socket expression",
			nft:        func() knftables.Interface { return noSocketNFT{knftables.NewFake(knftables.InetFamily, guardTable)} },
			addrs:      ports,
			steps:      []step{serving, draining, serving},
			wantSocket: false, wantRules: 1,
		},
		{
			name:  "no listener",
			nft:   func() knftables.Interface { return knftables.NewFake(knftables.InetFamily, guardTable) },
			addrs: []net.Addr{nil, &net.UnixAddr{Name: "x"}},
			steps: []step{{"serving", func(g *guard) error { return g.serving(ctx, true) }, nil, nil},
				{"draining", func(g *guard) error { return g.draining(ctx) }, nil, nil}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nft := tc.nft()
			g := newGuard(nft, testLogger(), tc.addrs...)
			for _, s := range tc.steps {
				if err := s.do(g); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				if len(g.ports) > 0 {
					if got := setElements(t, nft, guardListening); !slices.Equal(got, s.wantListening) {
						t.Errorf("after %s: listening %v, want %v", s.name, got, s.wantListening)
					}
					if got := setElements(t, nft, guardDraining); !slices.Equal(got, s.wantDraining) {
						t.Errorf("after %s: draining %v, want %v", s.name, got, s.wantDraining)
					}
				}
			}
			if g.socket != tc.wantSocket && len(g.ports) > 0 {
				t.Errorf("socket expression in use: %v, want %v", g.socket, tc.wantSocket)
			}
			if len(g.ports) == 0 {
				if tables, _ := nft.List(ctx, "table"); len(tables) > 0 {
					t.Errorf("no listener, yet tables %v", tables)
				}
				return
			}
			rules, err := nft.ListRules(ctx, guardChain)
			if err != nil || len(rules) != tc.wantRules {
				t.Errorf("%d rules (%v), want %d", len(rules), err, tc.wantRules)
			}
			if tc.golden != "" {
				if got := nft.(*knftables.Fake).Dump(); got != tc.golden {
					t.Errorf("table:\n%s\nwant:\n%s", got, tc.golden)
				}
			}
		})
	}
}

// TestControllerGuardUnavailable: without nftables the ingress serves
// anyway, and the failure is counted.
func TestControllerGuardUnavailable(t *testing.T) {
	client := fake.NewClientset()
	factory := informers.NewSharedInformerFactory(client, 0)
	src := Sources{
		Ingresses:      factory.Networking().V1().Ingresses(),
		IngressClasses: factory.Networking().V1().IngressClasses(),
		Services:       factory.Core().V1().Services(),
		EndpointSlices: factory.Discovery().V1().EndpointSlices(),
		Secrets:        factory.Core().V1().Secrets().Informer(),
	}
	reg := prometheus.NewRegistry()
	c, err := New(Config{HTTPAddr: "127.0.0.1:0", RestartGuard: true}, src, reg, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.newNFT = func() (knftables.Interface, error) { return nil, errors.New("nft: not found") }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	factory.Start(ctx.Done())
	go func() { _ = c.Run(ctx) }()
	eventually(t, "ready", c.Ready)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := -1.0
	for _, f := range families {
		if f.GetName() == "knit_ingress_restart_guard_errors_total" {
			for _, m := range f.GetMetric() {
				if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == "install" {
					got = m.GetCounter().GetValue()
				}
			}
		}
	}
	if got != 1 {
		t.Errorf("knit_ingress_restart_guard_errors_total{step=\"install\"} = %v, want 1", got)
	}
}

// TestControllerGuard: a Controller with RestartGuard guards its bound
// port while it serves and drains it when its context ends.
func TestControllerGuard(t *testing.T) {
	client := fake.NewClientset()
	factory := informers.NewSharedInformerFactory(client, 0)
	src := Sources{
		Ingresses:      factory.Networking().V1().Ingresses(),
		IngressClasses: factory.Networking().V1().IngressClasses(),
		Services:       factory.Core().V1().Services(),
		EndpointSlices: factory.Discovery().V1().EndpointSlices(),
		Secrets:        factory.Core().V1().Secrets().Informer(),
	}
	c, err := New(Config{HTTPAddr: "127.0.0.1:0", RestartGuard: true, ShutdownGrace: time.Second}, src, prometheus.NewRegistry(), testLogger())
	if err != nil {
		t.Fatal(err)
	}
	nft := knftables.NewFake(knftables.InetFamily, guardTable)
	// A previous ingress drained its port; the new one must clear that.
	prev := &guard{nft: nft, log: testLogger(), socket: true, ports: []string{"1"}}
	if err := prev.serving(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if err := prev.draining(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.newNFT = func() (knftables.Interface, error) { return nft, nil }

	ctx, cancel := context.WithCancel(context.Background())
	factory.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	eventually(t, "ready", c.Ready)
	port := []string{strings.TrimPrefix(c.HTTPAddr().String(), "127.0.0.1:")}
	if got := setElements(t, nft, guardListening); !slices.Equal(got, port) {
		t.Errorf("serving: listening %v, want %v", got, port)
	}
	if got := setElements(t, nft, guardDraining); len(got) != 0 {
		t.Errorf("serving: draining %v, want none (cleared for the new ingress)", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	factory.Shutdown()
	if got := setElements(t, nft, guardDraining); !slices.Equal(got, port) {
		t.Errorf("after shutdown: draining %v, want %v", got, port)
	}
}
