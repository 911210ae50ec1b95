package ingress

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/restartguard"
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

// TestGuard: the ingress's parameters give the knit-ingress table for the
// bound listeners' ports (the mechanism and its life, draining included,
// are tested in internal/restartguard).
func TestGuard(t *testing.T) {
	nft := knftables.NewFake(knftables.InetFamily, guardTable)
	addrs := guardAddrs(&net.TCPAddr{Port: 80}, &net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 443},
		nil, &net.UnixAddr{Name: "x"}) // a listener turned off; not TCP
	g := restartguard.New(nft, guardSpec, testLogger(), addrs)
	for range 2 { // idempotent: a refresh leaves the same table
		if err := g.Install(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if got := nft.Dump(); got != guardGolden {
		t.Errorf("table:\n%s\nwant:\n%s", got, guardGolden)
	}
}

// TestControllerGuardUnavailable: without nftables the ingress serves
// anyway, and the failure is counted.
func TestControllerGuardUnavailable(t *testing.T) {
	factory, src := fakeSources(fake.NewClientset())
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
	factory, src := fakeSources(fake.NewClientset())
	c, err := New(Config{HTTPAddr: "127.0.0.1:0", RestartGuard: true, ShutdownGrace: time.Second}, src, prometheus.NewRegistry(), testLogger())
	if err != nil {
		t.Fatal(err)
	}
	nft := knftables.NewFake(knftables.InetFamily, guardTable)
	// A previous ingress drained its port; the new one must clear that.
	prev := restartguard.New(nft, guardSpec, testLogger(), []netip.AddrPort{netip.MustParseAddrPort("[::]:1")})
	if err := prev.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := prev.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.newNFT = func() (knftables.Interface, error) { return nft, nil }

	ctx, cancel := context.WithCancel(context.Background())
	factory.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	eventually(t, "ready", c.Ready)
	port := []string{strings.TrimPrefix(c.HTTPAddr().String(), "127.0.0.1:")}
	if got := setElements(t, nft, guardSpec.Set); !slices.Equal(got, port) {
		t.Errorf("serving: listening %v, want %v", got, port)
	}
	if got := setElements(t, nft, guardSpec.Draining); len(got) != 0 {
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
	if got := setElements(t, nft, guardSpec.Draining); !slices.Equal(got, port) {
		t.Errorf("after shutdown: draining %v, want %v", got, port)
	}
}
