package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
)

// iptHarness is the usual harness with the iptables backend on fakeIPT
// (one per family) in place of nftables.
type iptHarness struct {
	*harness
	ipt map[family]*fakeIPT
}

func newIPTHarness(t *testing.T, cfg Config, objs ...runtime.Object) *iptHarness {
	t.Helper()
	h := &iptHarness{harness: newHarness(t, cfg, nil, objs...), ipt: map[family]*fakeIPT{v4: newFakeIPT(), v6: newFakeIPT()}}
	h.useIPT(h.ipt)
	return h
}

// useIPT switches the proxier to the iptables backend on the given tables.
func (h *iptHarness) useIPT(fams map[family]*fakeIPT) {
	tables := map[family]iptTables{}
	for f, x := range fams {
		tables[f] = x
	}
	h.p.ipt = newIPTBackend(tables, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
}

// batches returns the restore input of the last sync, both families.
func (h *iptHarness) batches(from map[family]int) string {
	var b strings.Builder
	for _, f := range []family{v4, v6} {
		for _, batch := range h.ipt[f].batches[from[f]:] {
			fmt.Fprintf(&b, "# %s\n%s", map[family]string{v4: "iptables-restore --noflush", v6: "ip6tables-restore --noflush"}[f], batch)
		}
	}
	return b.String()
}

func (h *iptHarness) mark() map[family]int {
	return map[family]int{v4: len(h.ipt[v4].batches), v6: len(h.ipt[v6].batches)}
}

func (h *iptHarness) dump() string {
	return "# IPv4\n" + h.ipt[v4].dump() + "# IPv6\n" + h.ipt[v6].dump()
}

// TestIPTablesGolden renders each Service shape alone (with this node) and
// compares the restore input of the first full sync with
// testdata/golden/<shape>.iptables.
func TestIPTablesGolden(t *testing.T) {
	for _, s := range shapes() {
		t.Run(s.name, func(t *testing.T) {
			objs := append([]runtime.Object{node(thisNode, "zone-a", nodeIP, nodeIP6)}, s.objs...)
			h := newIPTHarness(t, testConfig(), objs...)
			h.sync()
			golden(t, filepath.Join("testdata", "golden", s.name+".iptables"), h.batches(nil))
		})
	}
}

// TestIPTablesFixedRules checks the rules every node gets, with the jumps
// from the built-in chains, in the tables after the first sync.
func TestIPTablesFixedRules(t *testing.T) {
	h := newIPTHarness(t, testConfig(), node(thisNode, "zone-a", nodeIP, nodeIP6))
	h.sync()
	golden(t, filepath.Join("testdata", "golden", "iptables-tables.txt"), h.dump())
	for _, want := range []string{
		"-A POSTROUTING -m comment --comment \"knit postrouting rules\" -j KNIT-POSTROUTING",
		"-A KNIT-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
		"-A KNIT-POSTROUTING -j MARK --xor-mark 0x4000",
		"-A KNIT-SERVICES -m comment --comment \"knit service nodeports; must be the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KNIT-NODEPORTS",
		"-A KNIT-CLUSTER-IPS -m comment --comment \"answered on this node\" -d 10.43.0.10 -j RETURN",
	} {
		if !strings.Contains(h.ipt[v4].dump(), want+"\n") {
			t.Errorf("IPv4 tables lack %q", want)
		}
	}
	// A second full sync changes nothing and adds no second jump.
	before := h.dump()
	h.p.needFull.Store(true)
	h.sync()
	if after := h.dump(); after != before {
		t.Errorf("a second full sync changed the tables:\n%s", lineDiff(before, after))
	}
}

// TestIPTablesNodePortAddresses: with NodePortAddresses, NodePorts are
// captured on the listed node addresses only.
func TestIPTablesNodePortAddresses(t *testing.T) {
	cfg := testConfig()
	cfg.NodePortAddresses = []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24")}
	h := newIPTHarness(t, cfg, node(thisNode, "zone-a", nodeIP, nodeIP6))
	h.sync()
	got := h.ipt[v4].dump()
	if !strings.Contains(got, "-A KNIT-SERVICES "+iptComment("knit service nodeports; must be the last rule in this chain")+" -d 198.18.0.1 -j KNIT-NODEPORTS\n") ||
		strings.Contains(got, "--dst-type LOCAL ! -d 127.0.0.0/8") {
		t.Errorf("NodePorts not limited to 198.18.0.1:\n%s", got)
	}
	if strings.Contains(h.ipt[v6].dump(), "-j KNIT-NODEPORTS") {
		t.Error("IPv6 NodePorts captured although no IPv6 node address is listed")
	}
}

// TestIPTablesPartialSyncsEqualFullSync: after any series of changes
// applied by partial syncs, the tables are exactly what a full sync of the
// final state writes into fresh tables.
func TestIPTablesPartialSyncsEqualFullSync(t *testing.T) {
	h := newIPTHarness(t, testConfig(), allShapes()...)
	h.sync()
	steps := partialSyncSteps(h.harness)
	for _, st := range steps {
		m := h.mark()
		st.do()
		h.sync()
		if h.batches(m) == "" {
			t.Fatalf("%s: no restore", st.name)
		}
	}

	fresh := newIPTHarness(t, testConfig(), h.objects()...)
	fresh.sync()
	if got, want := h.dump(), fresh.dump(); got != want {
		t.Errorf("partial syncs diverged from a full render:\n%s", lineDiff(want, got))
	}
}

// TestIPTablesPartialSyncIsSmall: an endpoint change rewrites only that
// Service's own chains; a new Service adds its chains and rewrites the
// shared chains it has rules in; an unchanged render sends nothing.
func TestIPTablesPartialSyncIsSmall(t *testing.T) {
	var objs []runtime.Object
	for i := range 50 {
		name := fmt.Sprintf("s%d", i)
		objs = append(objs,
			service("bulk", name, fmt.Sprintf("10.43.10.%d", i+1)),
			slice("bulk", name, name+"-1", 8080, eps(3, fmt.Sprintf("10.44.%d", i), otherNode)))
	}
	h := newIPTHarness(t, testConfig(), objs...)
	h.sync()

	tests := []struct {
		name       string
		do         func()
		want, not  []string
		wantNoSync bool
	}{
		{
			name: "endpoint change",
			do:   func() { h.updateSlice(slice("bulk", "s7", "s7-1", 8080, eps(4, "10.44.7", otherNode))) },
			want: []string{"*nat\n", "-j DNAT --to-destination 10.44.7.4:8080"},
			not:  []string{"*filter", ":KNIT-SERVICES", "10.44.8.", "ip6tables"},
		},
		{
			name: "new Service",
			do: func() {
				h.addService(service("bulk", "new", "10.43.11.1"))
				h.addSlice(slice("bulk", "new", "new-1", 8080, eps(2, "10.44.99", otherNode)))
			},
			want: []string{":KNIT-SERVICES - [0:0]", "-d 10.43.11.1 -p tcp -m tcp --dport 80", "-A KNIT-CLUSTER-IPS"},
			not:  []string{"ip6tables"},
		},
		{
			// A zone hint on one endpoint only: hints are ignored unless
			// every endpoint has one.
			name: "a change that renders the same rules",
			do: func() {
				e := eps(4, "10.44.7", otherNode)
				e[0].zones = []string{"zone-x"}
				h.updateSlice(slice("bulk", "s7", "s7-1", 8080, e, withTrigger(time.Now())))
			},
			wantNoSync: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := h.mark()
			tc.do()
			h.sync()
			got := h.batches(m)
			if tc.wantNoSync {
				if got != "" {
					t.Fatalf("sent a batch for nothing:\n%s", got)
				}
				return
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("batch lacks %q:\n%s", w, got)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(got, n) {
					t.Errorf("batch has %q:\n%s", n, got)
				}
			}
		})
	}
}

// TestIPTablesFailedSyncRecovers: a failed restore is followed by a full
// sync that puts everything right, and a restarted proxier deletes the
// chains of Services that are gone, never touching chains it did not make.
func TestIPTablesFailedSyncRecovers(t *testing.T) {
	h := newIPTHarness(t, testConfig(), allShapes()...)
	// Someone else's chains and rules in the same tables.
	h.ipt[v4].tables[iptTableNAT]["OTHER-CHAIN"] = []string{"-j RETURN"}
	h.ipt[v4].tables[iptTableNAT]["PREROUTING"] = []string{"-j OTHER-CHAIN"}
	h.sync()

	h.ipt[v4].failNext = errors.New("iptables-restore: line 3 failed")
	h.addService(service("ns2", "new", "10.43.1.1"))
	h.addSlice(slice("ns2", "new", "new-1", 8080, eps(2, "10.42.5", otherNode)))
	if _, err := h.p.syncOnce(context.Background()); err == nil {
		t.Fatal("sync with a failing restore succeeded")
	}
	if !h.p.needFull.Load() {
		t.Fatal("a failed sync must ask for a full one")
	}
	m := h.mark()
	h.sync()
	if got := h.batches(m); !strings.Contains(got, ":KNIT-POSTROUTING") {
		t.Fatalf("the sync after a failure is not a full one:\n%s", got)
	}
	if !strings.Contains(h.ipt[v4].dump(), "-d 10.43.1.1 ") {
		t.Error("the new Service is missing after the full resync")
	}

	// A restarted knit (new proxier, same tables) with ns1/web gone.
	h.deleteService("ns1", "web")
	h2 := &iptHarness{harness: newHarness(t, testConfig(), nil, h.objects()...), ipt: h.ipt}
	h2.useIPT(h.ipt)
	h2.sync()
	fresh := newIPTHarness(t, testConfig(), h.objects()...)
	fresh.ipt[v4].tables[iptTableNAT]["OTHER-CHAIN"] = []string{"-j RETURN"}
	fresh.ipt[v4].tables[iptTableNAT]["PREROUTING"] = []string{"-j OTHER-CHAIN"}
	fresh.sync()
	if got, want := h2.dump(), fresh.dump(); got != want {
		t.Errorf("restart did not converge the tables:\n%s", lineDiff(want, got))
	}
	if !strings.Contains(h2.ipt[v4].dump(), "-A OTHER-CHAIN -j RETURN") {
		t.Error("a chain knit did not create was touched")
	}
}

// TestIPTablesNoIPv6: without a usable ip6tables, IPv4 works and IPv6
// Services are left alone.
func TestIPTablesNoIPv6(t *testing.T) {
	h := newIPTHarness(t, testConfig(), allShapes()...)
	delete(h.ipt, v6)
	h.useIPT(h.ipt)
	h.sync()
	if !strings.Contains(h.ipt[v4].dump(), "-d 10.43.0.24 ") {
		t.Error("the dual-stack Service's IPv4 side is missing")
	}
}

// TestHoldsProxyChains: the overlay's KNIT-FORWARD chain is not one of
// the proxy's leftovers.
func TestHoldsProxyChains(t *testing.T) {
	for _, tc := range []struct {
		save string
		want bool
	}{
		{"*filter\n:FORWARD DROP [0:0]\nCOMMIT\n", false},
		{"*filter\n:KNIT-FORWARD - [0:0]\n-A FORWARD -j KNIT-FORWARD\nCOMMIT\n", false},
		{"*nat\n:KNIT-SERVICES - [0:0]\nCOMMIT\n", true},
		{"*filter\n:KNIT-FORWARD - [0:0]\n:KNIT-PROXY-FIREWALL - [0:0]\nCOMMIT\n", true},
	} {
		if got := holdsProxyChains([]byte(tc.save)); got != tc.want {
			t.Errorf("holdsProxyChains(%q) = %v, want %v", tc.save, got, tc.want)
		}
	}
}

// TestIPTablesMismatchReported: the proxier's warnings (shown on /readyz)
// and metric carry the mismatch.
func TestIPTablesMismatchReported(t *testing.T) {
	h := newIPTHarness(t, testConfig())
	h.p.ipt.detect = &iptDetection{Variant: iptLegacy, Rules: map[string]int{iptLegacy: 3, iptNFT: 2}, Mismatch: true, Why: "test"}
	w := h.p.Warnings()
	if len(w) != 1 || !strings.Contains(w[0], "both iptables-legacy (3 rules) and iptables-nft (2 rules)") {
		t.Errorf("warnings = %q", w)
	}
}

func TestLinesAround(t *testing.T) {
	data := []byte("*nat\n:A - [0:0]\n-A A -j B\nCOMMIT\n")
	if got := linesAround(data, 4, 2); !strings.Contains(got, "-A A -j B") || strings.Contains(got, "*nat") {
		t.Errorf("linesAround = %q", got)
	}
}

// TestIPTablesCanary: when knit's rules are wiped by someone else (a
// firewall reload), the canary chain is gone too and the proxier is asked
// for a full sync, which puts everything back.
func TestIPTablesCanary(t *testing.T) {
	period := iptCanaryPeriod
	t.Cleanup(func() { iptCanaryPeriod = period })
	iptCanaryPeriod = 10 * time.Millisecond
	h := newIPTHarness(t, testConfig(), allShapes()...)
	flushed := make(chan struct{}, 1)
	h.p.ipt.onFlush = func() {
		select {
		case flushed <- struct{}{}:
		default:
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if _, err := h.p.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	want := h.dump()
	select {
	case <-flushed:
		t.Fatal("a full sync was asked for although nothing was removed")
	case <-time.After(100 * time.Millisecond):
	}
	// A firewall reload: every table back to its built-in chains.
	h.ipt[v6].mu.Lock()
	h.ipt[v6].tables = newFakeIPT().tables
	h.ipt[v6].mu.Unlock()
	select {
	case <-flushed:
	case <-time.After(5 * time.Second):
		t.Fatal("the removal of knit's rules was not noticed")
	}
	h.p.needFull.Store(true)
	h.sync()
	if got := h.dump(); got != want {
		t.Errorf("the full sync after the removal did not restore the rules:\n%s", lineDiff(want, got))
	}
}
