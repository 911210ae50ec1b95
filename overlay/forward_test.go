package overlay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"knit.dev/knit/internal/xtables"
)

// fakeFwdIPT is one family's filter table of one variant, with the rules
// the real one enforces that matter here: a jump to a missing chain cannot
// even be checked (iptables -C fails), a referenced chain cannot be
// deleted, and a restore batch commits whole or not at all.
type fakeFwdIPT struct {
	policy   string              // FORWARD policy
	forward  []string            // FORWARD rules
	chains   map[string][]string // user chains
	restores int
	failNext error
}

func newFakeFwdIPT() *fakeFwdIPT {
	return &fakeFwdIPT{policy: "ACCEPT", chains: map[string][]string{}}
}

func argsText(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if strings.Contains(a, " ") {
			a = `"` + a + `"`
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

func (f *fakeFwdIPT) listChain(chain string) ([]string, bool, error) {
	r, ok := f.chains[chain]
	return slices.Clone(r), ok, nil
}

func (f *fakeFwdIPT) jumpExists(args []string) (bool, error) {
	if _, ok := f.chains[args[len(args)-1]]; !ok {
		return false, errors.New("iptables: Couldn't load target")
	}
	return slices.Contains(f.forward, argsText(args)), nil
}

func (f *fakeFwdIPT) insertJump(args []string) error {
	if _, ok := f.chains[args[len(args)-1]]; !ok {
		return errors.New("iptables: Couldn't load target")
	}
	f.forward = append([]string{argsText(args)}, f.forward...)
	return nil
}

func (f *fakeFwdIPT) deleteJump(args []string) error {
	i := slices.Index(f.forward, argsText(args))
	if i < 0 {
		return errors.New("iptables: Bad rule")
	}
	f.forward = slices.Delete(f.forward, i, i+1)
	return nil
}

func (f *fakeFwdIPT) restore(_ context.Context, data []byte) error {
	f.restores++
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	work := map[string][]string{}
	for c, r := range f.chains {
		work[c] = slices.Clone(r)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		switch {
		case l == "*filter", l == "COMMIT":
		case strings.HasPrefix(l, ":"):
			work[strings.Fields(l[1:])[0]] = nil
		case strings.HasPrefix(l, "-A "):
			c, r, _ := strings.Cut(l[3:], " ")
			if _, ok := work[c]; !ok {
				return fmt.Errorf("no chain %s", c)
			}
			work[c] = append(work[c], r)
		case strings.HasPrefix(l, "-X "):
			c := l[3:]
			for _, r := range f.forward {
				if strings.HasSuffix(r, "-j "+c) {
					return fmt.Errorf("chain %s is referenced", c)
				}
			}
			delete(work, c)
		default:
			return fmt.Errorf("bad line %q", l)
		}
	}
	f.chains = work
	return nil
}

// save prints the table as iptables-save does.
func (f *fakeFwdIPT) save() string {
	var b strings.Builder
	fmt.Fprintf(&b, "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD %s [0:0]\n:OUTPUT ACCEPT [0:0]\n", f.policy)
	for _, c := range slices.Sorted(func(yield func(string) bool) {
		for c := range f.chains {
			if !yield(c) {
				return
			}
		}
	}) {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, r := range f.forward {
		fmt.Fprintf(&b, "-A FORWARD %s\n", r)
	}
	for c, rules := range f.chains {
		for _, r := range rules {
			fmt.Fprintf(&b, "-A %s %s\n", c, r)
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// fakeNode is a node's iptables: the installed variants' tables, by
// program name (iptables-nft, ip6tables-legacy, ...).
type fakeNode struct {
	mu        sync.Mutex
	installed []string
	tables    map[string]*fakeFwdIPT
	noIPv6    bool
}

func newFakeNode(installed ...string) *fakeNode {
	n := &fakeNode{installed: installed, tables: map[string]*fakeFwdIPT{}}
	for _, v := range installed {
		for _, v6 := range []bool{false, true} {
			n.tables[xtables.ToolsOf(v, v6).IPTables] = newFakeFwdIPT()
		}
	}
	return n
}

func (n *fakeNode) table(variant string, fam family) *fakeFwdIPT {
	return n.tables[xtables.ToolsOf(variant, fam == v6).IPTables]
}

func (n *fakeNode) system() xtables.System {
	return xtables.System{
		LookPath: func(p string) (string, error) {
			for _, v := range n.installed {
				for _, v6 := range []bool{false, true} {
					t := xtables.ToolsOf(v, v6)
					if p == t.IPTables || p == t.Save || p == t.Restore {
						return "/usr/sbin/" + p, nil
					}
				}
			}
			return "", errors.New("not found")
		},
		Save: func(_ context.Context, p string) ([]byte, error) {
			if t := n.tables[strings.TrimSuffix(p, "-save")]; t != nil {
				return []byte(t.save()), nil
			}
			return nil, errors.New("not found")
		},
		Version: func(context.Context, string) ([]byte, error) { return []byte("iptables v1.8.9 (nf_tables)"), nil },
	}
}

// useFakeNode points fw at the fake node.
func useFakeNode(fw *forward, n *fakeNode, nft string) {
	fw.sys = n.system()
	fw.open = func(tools xtables.Tools, fam family) (fwdIPT, error) {
		if fam == v6 && n.noIPv6 {
			return nil, errors.New("ip6tables: no IPv6 in this kernel")
		}
		if t := n.tables[tools.IPTables]; t != nil {
			return t, nil
		}
		return nil, errors.New("not found")
	}
	fw.nftChains = func(context.Context) ([]byte, error) { return []byte(nft), nil }
}

// noIPTables makes an Overlay's forward rules see a node without iptables
// or nft (the unit and netlink tests that are not about them).
func noIPTables(o *Overlay) {
	useFakeNode(o.fwd, newFakeNode(), `{"nftables":[]}`)
}

var (
	cidr4  = netip.MustParsePrefix("10.42.0.0/16")
	cidr6  = netip.MustParsePrefix("fd42::/56")
	cidr4b = netip.MustParsePrefix("10.99.0.0/16")
)

func fwdCfg(on bool, cidrs ...netip.Prefix) *Config {
	return &Config{ForwardRules: on, ClusterCIDRs: cidrs, ForwardMark: 0x4000}
}

func TestForwardRulesRender(t *testing.T) {
	got := fwdRules([]netip.Prefix{cidr4, cidr6}, v4, 0x4000)
	want := []string{
		`-s 10.42.0.0/16 -m comment --comment "knit-forward ` + markerOf(got) + `: from pods" -j ACCEPT`,
		`-d 10.42.0.0/16 -m comment --comment "knit: to pods" -j ACCEPT`,
		`-m mark --mark 0x4000/0x4000 -m comment --comment "knit: service traffic marked for masquerade" -j ACCEPT`,
		`-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "knit: replies" -j ACCEPT`,
	}
	if !slices.Equal(got, want) || len(markerOf(got)) != 16 {
		t.Errorf("rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if r := fwdRules([]netip.Prefix{cidr4}, v6, 0x4000); r != nil {
		t.Errorf("IPv6 rules for an IPv4-only cluster: %q", r)
	}
	if r := fwdRules([]netip.Prefix{cidr6}, v6, 0); len(r) != 3 || !strings.Contains(r[0], "fd42::/56") {
		t.Errorf("IPv6 rules without a mark: %q", r)
	}
	a, b := fwdRules([]netip.Prefix{cidr4}, v4, 0x4000), fwdRules([]netip.Prefix{cidr4b}, v4, 0x4000)
	if markerOf(a) == markerOf(b) {
		t.Error("different CIDRs, same marker")
	}
	if got := string(fwdRestoreData(a[:1])); !strings.HasPrefix(got, "*filter\n:KNIT-FORWARD - [0:0]\n-A KNIT-FORWARD -s 10.42.0.0/16") ||
		!strings.HasSuffix(got, "\nCOMMIT\n") {
		t.Errorf("restore data:\n%s", got)
	}
}

// TestForwardSync: the level-triggered cases, each starting from a node
// in some state and running syncs against it.
func TestForwardSync(t *testing.T) {
	jump := argsText(fwdJump)
	type step struct {
		cfg  *Config
		full bool
	}
	tests := []struct {
		name      string
		installed []string
		setup     func(n *fakeNode) // before the first sync
		steps     []step            // the first is a full sync, as in Run
		between   func(n *fakeNode) // after steps[0]
		noIPv6    bool
		wantOps   []string // iptables changes after the last step (all steps)
		check     func(t *testing.T, n *fakeNode)
		wantErr   string
	}{
		{
			name: "fresh node: chain and jump in the variant in use, both families", installed: []string{"legacy", "nft"},
			steps:   []step{{fwdCfg(true, cidr4, cidr6), true}, {fwdCfg(true, cidr4, cidr6), false}, {fwdCfg(true, cidr4, cidr6), true}},
			wantOps: []string{"chain", "jump", "chain", "jump"},
			check: func(t *testing.T, n *fakeNode) {
				for _, fam := range families {
					tb := n.table("nft", fam)
					if !slices.Equal(tb.forward, []string{jump}) || len(tb.chains["KNIT-FORWARD"]) != 4 {
						t.Errorf("nft %s: FORWARD %q, chain %q", fam, tb.forward, tb.chains["KNIT-FORWARD"])
					}
					if lg := n.table("legacy", fam); len(lg.chains) != 0 || len(lg.forward) != 0 {
						t.Errorf("legacy %s touched although not in use", fam)
					}
				}
			},
		},
		{
			name: "a DROP policy in the other variant: both programmed", installed: []string{"legacy", "nft"},
			setup: func(n *fakeNode) { n.table("legacy", v4).policy = "DROP" },
			steps: []step{{fwdCfg(true, cidr4), true}},
			// IPv4 only: no chain in either variant's ip6tables.
			wantOps: []string{"chain", "jump", "chain", "jump"},
			check: func(t *testing.T, n *fakeNode) {
				for _, v := range []string{"legacy", "nft"} {
					if !slices.Equal(n.table(v, v4).forward, []string{jump}) {
						t.Errorf("%s: FORWARD %q", v, n.table(v, v4).forward)
					}
					if len(n.table(v, v6).chains) != 0 {
						t.Errorf("%s: IPv6 chain in an IPv4-only cluster", v)
					}
				}
			},
		},
		{
			name: "Docker sets DROP in the other variant later: the next full sync covers it", installed: []string{"legacy", "nft"},
			steps:   []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4), false}, {fwdCfg(true, cidr4), true}},
			between: func(n *fakeNode) { n.table("legacy", v4).policy = "DROP" },
			wantOps: []string{"chain", "jump", "chain", "jump"},
			check: func(t *testing.T, n *fakeNode) {
				if !slices.Equal(n.table("legacy", v4).forward, []string{jump}) {
					t.Errorf("legacy FORWARD %q", n.table("legacy", v4).forward)
				}
			},
		},
		{
			name: "restart with nothing changed: no writes", installed: []string{"nft"},
			setup: func(n *fakeNode) {
				tb := n.table("nft", v4)
				tb.chains["KNIT-FORWARD"] = fwdRules([]netip.Prefix{cidr4}, v4, 0x4000)
				tb.forward = []string{`-j DOCKER-USER`, jump}
			},
			steps: []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4), true}},
			check: func(t *testing.T, n *fakeNode) {
				if tb := n.table("nft", v4); tb.restores != 0 || !slices.Equal(tb.forward, []string{`-j DOCKER-USER`, jump}) {
					t.Errorf("restores %d, FORWARD %q (the jump stays where it is)", tb.restores, tb.forward)
				}
			},
		},
		{
			name: "jump deleted: the next sync puts it back, once", installed: []string{"nft"},
			steps:   []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4), false}, {fwdCfg(true, cidr4), false}},
			between: func(n *fakeNode) { n.table("nft", v4).forward = nil },
			wantOps: []string{"chain", "jump", "jump"},
		},
		{
			name: "jump and chain deleted: the next sync puts both back", installed: []string{"nft"},
			steps: []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4), false}},
			between: func(n *fakeNode) {
				n.table("nft", v4).forward = nil
				delete(n.table("nft", v4).chains, "KNIT-FORWARD")
			},
			wantOps: []string{"chain", "jump", "chain", "jump"},
		},
		{
			name: "chain flushed: the next full sync refills it", installed: []string{"nft"},
			steps:   []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4), true}},
			between: func(n *fakeNode) { n.table("nft", v4).chains["KNIT-FORWARD"] = nil },
			wantOps: []string{"chain", "jump", "chain"},
		},
		{
			name: "cluster CIDR changed: chain rewritten, no second jump", installed: []string{"nft"},
			steps:   []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4b), false}},
			wantOps: []string{"chain", "jump", "chain"},
			check: func(t *testing.T, n *fakeNode) {
				tb := n.table("nft", v4)
				if len(tb.forward) != 1 || !strings.Contains(tb.chains["KNIT-FORWARD"][0], "10.99.0.0/16") {
					t.Errorf("FORWARD %q, chain %q", tb.forward, tb.chains["KNIT-FORWARD"])
				}
			},
		},
		{
			name: "turned off: jump and chain removed from every variant", installed: []string{"legacy", "nft"},
			setup: func(n *fakeNode) { n.table("legacy", v4).policy = "DROP" },
			steps: []step{{fwdCfg(true, cidr4, cidr6), true}, {fwdCfg(false, cidr4, cidr6), false}, {fwdCfg(false, cidr4, cidr6), false}},
			// Both families of both variants: legacy is in use (its IPv4
			// DROP policy), and a variant in use gets both.
			wantOps: []string{"chain", "jump", "chain", "jump", "chain", "jump", "chain", "jump", "delete", "delete", "delete", "delete"},
			check: func(t *testing.T, n *fakeNode) {
				for name, tb := range n.tables {
					if len(tb.forward) != 0 || len(tb.chains) != 0 {
						t.Errorf("%s: FORWARD %q chains %v", name, tb.forward, tb.chains)
					}
				}
			},
		},
		{
			name: "no iptables: nothing, no error", installed: nil,
			steps: []step{{fwdCfg(true, cidr4), true}, {fwdCfg(true, cidr4), true}},
		},
		{
			name: "kernel without IPv6: IPv4 only", installed: []string{"nft"}, noIPv6: true,
			steps:   []step{{fwdCfg(true, cidr4, cidr6), true}},
			wantOps: []string{"chain", "jump"},
		},
		{
			name: "restore fails: error, and the next sync retries", installed: []string{"nft"},
			setup:   func(n *fakeNode) { n.table("nft", v4).failNext = errors.New("iptables-restore: line 2 failed") },
			steps:   []step{{fwdCfg(true, cidr4), true}},
			wantErr: "line 2 failed",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := newFakeNode(tc.installed...)
			n.noIPv6 = tc.noIPv6
			if tc.setup != nil {
				tc.setup(n)
			}
			var logs bytes.Buffer
			fw := newForward(slog.New(slog.NewTextHandler(&logs, nil)))
			useFakeNode(fw, n, `{"nftables":[]}`)
			var ops []string
			var err error
			for i, s := range tc.steps {
				if i == 1 && tc.between != nil {
					tc.between(n)
				}
				_, err = fw.sync(context.Background(), s.cfg, s.full, func(op string) { ops = append(ops, op) })
				if err != nil && tc.wantErr == "" {
					t.Fatalf("sync %d: %v", i, err)
				}
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				if _, err := fw.sync(context.Background(), tc.steps[0].cfg, false, func(string) {}); err != nil {
					t.Fatalf("retry: %v", err)
				}
				return
			}
			if !slices.Equal(ops, tc.wantOps) {
				t.Errorf("ops %q, want %q", ops, tc.wantOps)
			}
			if tc.installed == nil && strings.Count(logs.String(), "no iptables on this node") != 1 {
				t.Errorf("want one log line about missing iptables:\n%s", logs.String())
			}
			if tc.check != nil {
				tc.check(t, n)
			}
		})
	}
}

func TestNFTForwardDrops(t *testing.T) {
	tests := []struct {
		name string
		js   string
		want []string
	}{
		{name: "none", js: `{"nftables":[{"metainfo":{"version":"1.0.9"}}]}`},
		{name: "native firewall with policy drop", js: `{"nftables":[{"metainfo":{}},
			{"chain":{"family":"inet","table":"filter","name":"forward","handle":2,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
			{"chain":{"family":"inet","table":"filter","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}}]}`,
			want: []string{"inet filter forward"}},
		{name: "accept policy is fine", js: `{"nftables":[
			{"chain":{"family":"inet","table":"filter","name":"forward","type":"filter","hook":"forward","prio":0,"policy":"accept"}}]}`},
		{name: "iptables-nft's FORWARD and knit's tables are not foreign", js: `{"nftables":[
			{"chain":{"family":"ip","table":"filter","name":"FORWARD","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
			{"chain":{"family":"ip6","table":"filter","name":"FORWARD","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
			{"chain":{"family":"inet","table":"knit-proxy","name":"forward","type":"filter","hook":"forward","prio":0,"policy":"drop"}}]}`},
		{name: "regular chains have no hook", js: `{"nftables":[{"chain":{"family":"inet","table":"fw","name":"allow"}}]}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := nftForwardDrops([]byte(tc.js))
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, d := range got {
				names = append(names, d.String())
			}
			if !slices.Equal(names, tc.want) {
				t.Errorf("got %q, want %q", names, tc.want)
			}
		})
	}
	if _, err := nftForwardDrops([]byte("not json")); err == nil {
		t.Error("bad JSON accepted")
	}
}

// TestForwardBlockedReported: a native nftables forward drop is logged once
// per change and shown on the gauge.
func TestForwardBlockedReported(t *testing.T) {
	drop := `{"nftables":[{"chain":{"family":"inet","table":"filter","name":"forward","type":"filter","hook":"forward","prio":0,"policy":"drop"}}]}`
	var logs bytes.Buffer
	fw := newForward(slog.New(slog.NewTextHandler(&logs, nil)))
	js := drop
	fw.nftChains = func(context.Context) ([]byte, error) { return []byte(js), nil }
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "g"}, []string{"family", "table", "chain"})
	for range 3 {
		fw.checkNFT(context.Background(), g)
	}
	if n := strings.Count(logs.String(), "policy drop may drop pod traffic"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, logs.String())
	}
	if v := testutil.ToFloat64(g.WithLabelValues("inet", "filter", "forward")); v != 1 {
		t.Errorf("gauge = %v", v)
	}
	js = `{"nftables":[]}`
	fw.checkNFT(context.Background(), g)
	if testutil.CollectAndCount(g) != 0 || !strings.Contains(logs.String(), "no nftables forward chain with policy drop any more") {
		t.Errorf("not cleared: %d series\n%s", testutil.CollectAndCount(g), logs.String())
	}
}
