package restartguard_test

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/restartguard"
	"knit.dev/knit/lab/sandbox"
)

// TestMain runs the package's tests in the network sandbox: the kernel
// test needs it (it skips outside); the others run there too, harmlessly.
func TestMain(m *testing.M) { sandbox.Main(m) }

// The two shapes the users have: address . port keys over UDP and TCP
// (cluster DNS), and port keys over TCP with a draining set (the ingress).
var (
	addrPortSpec = restartguard.Spec{
		Table: "t-addrport", TableComment: "table", Key: restartguard.AddrPort,
		Protocols: []restartguard.Protocol{restartguard.UDP, restartguard.TCP},
		Set:       "serving", SetComment: "served", Timeout: 10 * time.Minute,
		DropComment: "no socket",
	}
	portSpec = restartguard.Spec{
		Table: "t-port", TableComment: "table", Key: restartguard.Port,
		Protocols: []restartguard.Protocol{restartguard.TCP},
		Set:       "listening", SetComment: "served", Timeout: 10 * time.Minute,
		DropComment: "no socket",
		Draining:    "draining", DrainingComment: "closing", DrainTimeout: time.Minute,
		DrainDropComment: "closing",
	}
	// addrPortDrainSpec: both differences at once.
	addrPortDrainSpec = func() restartguard.Spec {
		s := addrPortSpec
		s.Table, s.Protocols = "t-both", []restartguard.Protocol{restartguard.TCP}
		s.Draining, s.DrainingComment, s.DrainTimeout, s.DrainDropComment = "draining", "closing", time.Minute, "closing"
		return s
	}()
)

const addrPortGolden = `add table inet t-addrport { comment "table" ; }
add chain inet t-addrport input { type filter hook input priority -10 ; }
add set inet t-addrport serving-v4 { type ipv4_addr . inet_service ; flags timeout ; timeout 600s ; comment "served" ; }
add set inet t-addrport serving-v6 { type ipv6_addr . inet_service ; flags timeout ; timeout 600s ; comment "served" ; }
add rule inet t-addrport input ip daddr . udp dport @serving-v4 socket transparent 0 accept
add rule inet t-addrport input ip daddr . udp dport @serving-v4 socket transparent 1 accept
add rule inet t-addrport input ip daddr . udp dport @serving-v4 drop comment "no socket"
add rule inet t-addrport input tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @serving-v4 socket transparent 0 accept
add rule inet t-addrport input tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @serving-v4 socket transparent 1 accept
add rule inet t-addrport input tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @serving-v4 drop comment "no socket"
add rule inet t-addrport input ip6 daddr . udp dport @serving-v6 socket transparent 0 accept
add rule inet t-addrport input ip6 daddr . udp dport @serving-v6 socket transparent 1 accept
add rule inet t-addrport input ip6 daddr . udp dport @serving-v6 drop comment "no socket"
add rule inet t-addrport input tcp flags & (fin | syn | rst | ack) == syn ip6 daddr . tcp dport @serving-v6 socket transparent 0 accept
add rule inet t-addrport input tcp flags & (fin | syn | rst | ack) == syn ip6 daddr . tcp dport @serving-v6 socket transparent 1 accept
add rule inet t-addrport input tcp flags & (fin | syn | rst | ack) == syn ip6 daddr . tcp dport @serving-v6 drop comment "no socket"
add element inet t-addrport serving-v4 { 10.43.0.10 . 53 }
add element inet t-addrport serving-v6 { fd43::a . 53 }
`

const portGolden = `add table inet t-port { comment "table" ; }
add chain inet t-port input { type filter hook input priority -10 ; }
add set inet t-port draining { type inet_service ; flags timeout ; timeout 60s ; comment "closing" ; }
add set inet t-port listening { type inet_service ; flags timeout ; timeout 600s ; comment "served" ; }
add rule inet t-port input tcp flags & (fin | syn | rst | ack) == syn tcp dport @draining drop comment "closing"
add rule inet t-port input tcp flags & (fin | syn | rst | ack) == syn tcp dport @listening socket transparent 0 accept
add rule inet t-port input tcp flags & (fin | syn | rst | ack) == syn tcp dport @listening socket transparent 1 accept
add rule inet t-port input tcp flags & (fin | syn | rst | ack) == syn tcp dport @listening drop comment "no socket"
add element inet t-port listening { 80 }
add element inet t-port listening { 443 }
`

// noSocketNFT is a kernel without the nftables socket expression.
type noSocketNFT struct{ *knftables.Fake }

func (n noSocketNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	if strings.Contains(tx.String(), " socket ") {
		return errors.New("Error: Could not process rule: No such file or directory")
	}
	return n.Fake.Run(ctx, tx)
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// elements lists every set's elements ("set: a.b"), sorted; sets without
// elements are left out.
func elements(t *testing.T, nft knftables.Interface) []string {
	t.Helper()
	ctx := context.Background()
	sets, err := nft.List(ctx, "sets")
	if err != nil {
		if knftables.IsNotFound(err) {
			return nil
		}
		t.Fatal(err)
	}
	var out []string
	for _, set := range sets {
		elems, err := nft.ListElements(ctx, "set", set)
		if err != nil {
			t.Fatalf("list %s: %v", set, err)
		}
		for _, e := range elems {
			out = append(out, set+": "+strings.Join(e.Key, "."))
		}
	}
	slices.Sort(out)
	return out
}

func addrPorts(s ...string) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range s {
		out = append(out, netip.MustParseAddrPort(a))
	}
	return out
}

// TestGuard walks each shape through an owner's life: serving, refreshed,
// draining at a graceful stop, refreshed while draining, and the next
// owner serving; the table it leaves must be the golden one.
func TestGuard(t *testing.T) {
	ctx := context.Background()
	install := func(g *restartguard.Guard) error { return g.Install(ctx) }
	refresh := func(g *restartguard.Guard) error { return g.Refresh(ctx) }
	drain := func(g *restartguard.Guard) error { return g.Drain(ctx) }
	type step struct {
		name string
		do   func(g *restartguard.Guard) error
		want []string // every set's elements afterwards
	}
	serving443 := []string{"listening: 443", "listening: 80"}
	draining443 := append([]string{"draining: 443", "draining: 80"}, serving443...)
	for _, tc := range []struct {
		name       string
		spec       restartguard.Spec
		noSocket   bool
		bound      []netip.AddrPort
		steps      []step
		wantErr    string // from the first step, which must fail with it
		wantSocket bool
		wantRules  int
		golden     string // after the last step
		wantString string
	}{{
		name: "address . port, UDP and TCP",
		spec: addrPortSpec,
		bound: addrPorts("10.43.0.10:53", "[fd43::a]:53", "10.43.0.10:53",
			"0.0.0.0:5353", // unspecified: not an address of the owner's own, not guarded
			"[::ffff:10.43.0.11]:0"),
		steps: []step{
			{"install", install, []string{"serving-v4: 10.43.0.10.53", "serving-v6: fd43::a.53"}},
			{"refresh", refresh, []string{"serving-v4: 10.43.0.10.53", "serving-v6: fd43::a.53"}},
		},
		wantSocket: true, wantRules: 12, golden: addrPortGolden,
		wantString: "table inet t-addrport, addresses 10.43.0.10:53,[fd43::a]:53",
	}, {
		name:  "port, TCP, draining",
		spec:  portSpec,
		bound: addrPorts("[::]:80", "10.0.0.1:443", "[::]:0"),
		steps: []step{
			{"install", install, serving443},
			{"drain", drain, draining443},
			{"refresh keeps draining", refresh, draining443},
			{"next owner installs", install, serving443},
		},
		wantSocket: true, wantRules: 4, golden: portGolden,
		wantString: "table inet t-port, ports 80,443",
	}, {
		name:  "address . port with draining",
		spec:  addrPortDrainSpec,
		bound: addrPorts("10.0.0.1:80", "[fd00::1]:80"),
		steps: []step{
			{"install", install, []string{"serving-v4: 10.0.0.1.80", "serving-v6: fd00::1.80"}},
			{"drain", drain, []string{"draining-v4: 10.0.0.1.80", "draining-v6: fd00::1.80", "serving-v4: 10.0.0.1.80", "serving-v6: fd00::1.80"}},
			{"next owner installs", install, []string{"serving-v4: 10.0.0.1.80", "serving-v6: fd00::1.80"}},
		},
		wantSocket: true, wantRules: 8,
	}, {
		name:     "kernel without the socket expression keeps the draining half",
		spec:     portSpec,
		noSocket: true,
		bound:    addrPorts("[::]:80", "[::]:443"),
		steps: []step{
			{"install", install, serving443},
			{"drain", drain, draining443},
			{"next owner installs", install, serving443},
		},
		wantSocket: false, wantRules: 1,
	}, {
		name:     "kernel without the socket expression, no draining set: no table",
		spec:     addrPortSpec,
		noSocket: true,
		bound:    addrPorts("10.43.0.10:53"),
		steps:    []step{{"install", install, nil}},
		wantErr:  "No such file",
	}, {
		name:  "nothing to guard: no table",
		spec:  portSpec,
		bound: addrPorts("[::]:0"),
		steps: []step{{"install", install, nil}, {"drain", drain, nil}, {"refresh", refresh, nil}},
	}, {
		name: "a spec without timeout: error, no table",
		spec: func() restartguard.Spec {
			s := portSpec
			s.Timeout, s.Protocols = 0, []restartguard.Protocol{"sctp"}
			return s
		}(),
		bound:   addrPorts("[::]:80"),
		steps:   []step{{"install", install, nil}},
		wantErr: `needs a Timeout of 1s or more, a known protocol (not "sctp")`,
	}, {
		name:    "drain without a draining set",
		spec:    addrPortSpec,
		bound:   addrPorts("10.43.0.10:53"),
		steps:   []step{{"drain", drain, nil}},
		wantErr: "has no draining set",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			fake := knftables.NewFake(knftables.InetFamily, tc.spec.Table)
			var nft knftables.Interface = fake
			if tc.noSocket {
				nft = noSocketNFT{fake}
			}
			g := restartguard.New(nft, tc.spec, discard(), tc.bound)
			for i, s := range tc.steps {
				err := s.do(g)
				if i == 0 && tc.wantErr != "" {
					if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
						t.Fatalf("%s: error %v, want one with %q", s.name, err, tc.wantErr)
					}
					if fake.Table != nil {
						t.Errorf("%s failed, yet left a table:\n%s", s.name, fake.Dump())
					}
					return
				}
				if err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				if got := elements(t, nft); !slices.Equal(got, s.want) {
					t.Errorf("after %s: %q, want %q", s.name, got, s.want)
				}
			}
			if g.Empty() {
				if fake.Table != nil {
					t.Errorf("nothing to guard, yet a table:\n%s", fake.Dump())
				}
				return
			}
			if g.Socket() != tc.wantSocket {
				t.Errorf("socket expression in use: %v, want %v", g.Socket(), tc.wantSocket)
			}
			if rules, err := nft.ListRules(ctx, restartguard.Chain); err != nil || len(rules) != tc.wantRules {
				t.Errorf("%d rules (%v), want %d", len(rules), err, tc.wantRules)
			}
			if tc.golden != "" {
				if got := fake.Dump(); got != tc.golden {
					t.Errorf("table:\n%s\nwant:\n%s", got, tc.golden)
				}
			}
			if tc.wantString != "" && g.String() != tc.wantString {
				t.Errorf("String() = %q, want %q", g.String(), tc.wantString)
			}
		})
	}
}

// TestKeep: Keep refreshes, reports a failure and goes on, returns when
// its context ends; a transient failure that the draining half got past
// does not cost the socket rules for good.
func TestKeep(t *testing.T) {
	spec := portSpec
	spec.Timeout = time.Second // refresh every 250 ms
	fake := knftables.NewFake(knftables.InetFamily, spec.Table)
	// Transaction 1 is Install. Refresh 1 fails (2: the whole table, 3:
	// the draining half), refresh 2 succeeds (4), refresh 3 falls back
	// (5 fails, 6 succeeds), refresh 4 is whole again (7).
	flaky := &countingNFT{Fake: fake, fail: []int{2, 3, 5}}
	g := restartguard.New(flaky, spec, discard(), addrPorts("[::]:80"))
	if err := g.Install(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	failed := make(chan error, 10)
	done := make(chan struct{})
	go func() { g.Keep(ctx, func(err error) { failed <- err }); close(done) }()
	deadline := time.After(10 * time.Second)
	for flaky.runs() < 8 {
		select {
		case <-deadline:
			t.Fatalf("%d transactions in 10 s", flaky.runs())
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	<-done
	if len(failed) != 1 {
		t.Errorf("%d failures reported, want 1", len(failed))
	}
	if !g.Socket() {
		t.Error("a transient failure left the guard without the socket expression")
	}
	if rules, err := fake.ListRules(context.Background(), restartguard.Chain); err != nil || len(rules) != 4 {
		t.Errorf("%d rules (%v), want 4", len(rules), err)
	}
}

// countingNFT counts transactions and fails those numbered in fail.
type countingNFT struct {
	*knftables.Fake
	mu   sync.Mutex
	n    int
	fail []int
}

func (c *countingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	c.mu.Lock()
	c.n++
	n := c.n
	c.mu.Unlock()
	if slices.Contains(c.fail, n) {
		return errors.New("nft: busy")
	}
	return c.Fake.Run(ctx, tx)
}

func (c *countingNFT) runs() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}
