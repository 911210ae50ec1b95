package proxy

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-iptables/iptables"
	"k8s.io/apimachinery/pkg/types"

	"knit.dev/knit/internal/xtables"
)

// iptBackend programs the state with iptables, for kernels without
// nftables. One sync is one iptables-restore --noflush batch per family
// (iptables-restore, ip6tables-restore) that names only knit's chains:
// declaring a chain in the batch flushes and refills it, chains knit did
// not create are never named, and the built-in chains only get the jump
// rules of iptJumps, inserted once per full sync if missing.
//
// Like the nftables backend it remembers the render of every Service. A
// partial sync re-renders the changed Services and sends only the chains
// whose rules changed: their own chains, and a shared chain (KNIT-SERVICES,
// KNIT-NODEPORTS, …) whole if any of its Services' rules changed. An
// endpoint change rewrites only the Service's KNIT-SVC/KNIT-SEP chains;
// nothing at all is sent when the rules come out the same. A full sync (the
// first, every SyncPeriod, after any failure) rewrites every knit chain and
// deletes per-Service chains no Service renders (also those of a previous
// process), found by listing the table.
type iptBackend struct {
	log    *slog.Logger
	fam    map[family]iptTables // families with a working iptables
	detect *iptDetection        // nil in tests

	renders     map[types.NamespacedName]map[family]*iptRender
	static      map[family]*iptStatic
	staticRules int

	// onFlush, if set, is called when knit's rules were removed by someone
	// else (a firewall reload); the monitor starts after the first full sync.
	onFlush        func()
	monitorStarted bool
}

// iptTables is one family's iptables: a restore batch, the jumps from the
// built-in chains, and the names of existing chains. Unit tests fake it.
type iptTables interface {
	restore(ctx context.Context, data []byte) error
	ensureJumps(jumps []iptJump) error
	listChains(table string) ([]string, error)
	chainExists(table, chain string) (bool, error)
	randomFully() bool
}

func newIPTBackend(fam map[family]iptTables, log *slog.Logger) *iptBackend {
	return &iptBackend{
		log:     log,
		fam:     fam,
		renders: map[types.NamespacedName]map[family]*iptRender{},
		static:  map[family]*iptStatic{},
	}
}

func (b *iptBackend) families() []family {
	var out []family
	for _, f := range []family{v4, v6} {
		if b.fam[f] != nil {
			out = append(out, f)
		}
	}
	return out
}

// sync programs st: every Service when full, else those in changed.
func (b *iptBackend) sync(ctx context.Context, st *state, changed map[types.NamespacedName]bool, full bool) (syncResult, error) {
	r := newIPTRenderer(st)
	if full {
		return b.fullSync(ctx, st, r)
	}
	return b.partialSync(ctx, st, r, changed)
}

func (b *iptBackend) renderAll(st *state, r *iptRenderer, names []types.NamespacedName) map[types.NamespacedName]map[family]*iptRender {
	out := make(map[types.NamespacedName]map[family]*iptRender, len(names))
	for _, name := range names {
		if rd := b.render(st, r, name); rd != nil {
			out[name] = rd
		}
	}
	return out
}

// render renders one Service in every family; nil if it has no rules.
func (b *iptBackend) render(st *state, r *iptRenderer, name types.NamespacedName) map[family]*iptRender {
	info := st.services[name]
	if info == nil {
		return nil
	}
	var out map[family]*iptRender
	for _, f := range b.families() {
		if rd := r.renderService(name, info, st.endpoints[name], f); rd != nil {
			if out == nil {
				out = map[family]*iptRender{}
			}
			out[f] = rd
		}
	}
	return out
}

func (b *iptBackend) fullSync(ctx context.Context, st *state, r *iptRenderer) (syncResult, error) {
	names := sortedNames(st.services)
	renders := b.renderAll(st, r, names)
	static := map[family]*iptStatic{}
	for _, f := range b.families() {
		ipt := b.fam[f]
		static[f] = iptStaticRules(st.static, f, ipt.randomFully())
		// Per-Service chains in the kernel that no Service renders: of
		// removed Services, or left by a previous process.
		var stale []string
		existing, err := ipt.listChains(iptTableNAT)
		if err != nil {
			return syncResult{}, fmt.Errorf("iptables full sync (%s): list chains: %w", f, err)
		}
		want := map[string]bool{}
		for _, name := range names {
			if rd := renders[name][f]; rd != nil {
				for _, c := range rd.chains {
					want[c.name] = true
				}
			}
		}
		for _, c := range existing {
			if iptServiceChain(c) && !want[c] {
				stale = append(stale, c)
			}
		}
		slices.Sort(stale)
		var chains []iptChain
		for _, name := range names {
			if rd := renders[name][f]; rd != nil {
				chains = append(chains, rd.chains...)
			}
		}
		data := b.restoreData(names, func(n types.NamespacedName) *iptRender { return renders[n][f] },
			static[f], allSlots(), chains, stale, true)
		if err := ipt.restore(ctx, data); err != nil {
			return syncResult{}, fmt.Errorf("iptables full sync (%s): %w", f, err)
		}
		// After the restore, which created knit's chains: hook them in.
		if err := ipt.ensureJumps(iptJumps); err != nil {
			return syncResult{}, fmt.Errorf("iptables full sync (%s): %w", f, err)
		}
	}
	b.renders, b.static = renders, static
	b.staticRules = 0
	for _, s := range static {
		b.staticRules += s.rules()
	}
	if b.onFlush != nil && !b.monitorStarted {
		b.monitorStarted = true
		go b.monitor(ctx)
	}
	return b.result(), nil
}

// iptCanary is an empty chain in the mangle table that only knit creates:
// when it is gone, something (a firewall reload, iptables -X, an
// iptables-restore without --noflush) has removed knit's rules too, and a
// full sync puts them back without waiting for the SyncPeriod. The mangle
// table is small, so checking it is cheap; a tool that wipes only nat or
// filter is caught by the periodic full sync. kube-proxy's iptables mode
// watches its KUBE-PROXY-CANARY the same way.
const iptCanary = "KNIT-PROXY-CANARY"

// iptCanaryPeriod is how often the canary is checked.
var iptCanaryPeriod = 10 * time.Second

func (b *iptBackend) monitor(ctx context.Context) {
	t := time.NewTicker(iptCanaryPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, f := range b.families() {
			ok, err := b.fam[f].chainExists(iptTableMangle, iptCanary)
			if err != nil {
				b.log.Debug("checking the iptables canary failed", "family", f.String(), "err", err)
				continue
			}
			if !ok {
				b.log.Warn("knit's iptables rules were removed by something else (firewall reload?); running a full sync", "family", f.String())
				b.onFlush()
				break
			}
		}
	}
}

func (b *iptBackend) partialSync(ctx context.Context, st *state, r *iptRenderer, changed map[types.NamespacedName]bool) (syncResult, error) {
	next := make(map[types.NamespacedName]map[family]*iptRender, len(changed))
	for name := range changed {
		next[name] = b.render(st, r, name)
	}
	var names []types.NamespacedName // sorted, computed when needed
	for _, f := range b.families() {
		var slots []iptSlot
		var chains []iptChain // own chains to (re)write
		var deleted []string
		for name, rd := range next {
			old, cur := b.renders[name][f], rd[f]
			if old.equal(cur) {
				continue
			}
			for s := range numSlots {
				var o, c []string
				if old != nil {
					o = old.shared[s]
				}
				if cur != nil {
					c = cur.shared[s]
				}
				if !slices.Equal(o, c) && !slices.Contains(slots, s) {
					slots = append(slots, s)
				}
			}
			oldChains := map[string][]string{}
			if old != nil {
				for _, c := range old.chains {
					oldChains[c.name] = c.rules
				}
			}
			if cur != nil {
				for _, c := range cur.chains {
					prev, ok := oldChains[c.name]
					delete(oldChains, c.name)
					if !ok || !slices.Equal(prev, c.rules) {
						chains = append(chains, c)
					}
				}
			}
			for c := range oldChains {
				deleted = append(deleted, c)
			}
		}
		if len(slots) == 0 && len(chains) == 0 && len(deleted) == 0 {
			continue
		}
		// Shared chains are written from every Service's render: the
		// cached ones, and the new ones of the changed Services.
		renders := func(name types.NamespacedName) *iptRender {
			if rd, ok := next[name]; ok {
				return rd[f]
			}
			return b.renders[name][f]
		}
		if len(slots) > 0 && names == nil {
			names = sortedNames(st.services)
		}
		slices.Sort(slots)
		slices.SortFunc(chains, func(a, b iptChain) int { return strings.Compare(a.name, b.name) })
		slices.Sort(deleted)
		data := b.restoreData(names, renders, b.static[f], slots, chains, deleted, false)
		if err := b.fam[f].restore(ctx, data); err != nil {
			return syncResult{}, fmt.Errorf("iptables partial sync (%s): %w", f, err)
		}
	}
	for name, rd := range next {
		if rd == nil {
			delete(b.renders, name)
		} else {
			b.renders[name] = rd
		}
	}
	return b.result(), nil
}

func allSlots() []iptSlot {
	out := make([]iptSlot, numSlots)
	for i := range out {
		out[i] = iptSlot(i)
	}
	return out
}

// restoreData writes an iptables-restore --noflush batch: for each
// table, the chains it (re)writes are declared (which creates or flushes
// them), then their rules, then the chains to delete (declared first: a
// chain must be empty to go). Shared chains in slots are written whole, with
// the rules of every Service in name order; full also writes the fixed
// chains.
func (b *iptBackend) restoreData(names []types.NamespacedName, render func(types.NamespacedName) *iptRender,
	static *iptStatic, slots []iptSlot, chains []iptChain, deleted []string, full bool) []byte {
	var buf bytes.Buffer
	if full {
		buf.WriteString("*" + iptTableMangle + "\n:" + iptCanary + " - [0:0]\nCOMMIT\n")
	}
	for _, table := range []string{iptTableFilter, iptTableNAT} {
		var decl, rules bytes.Buffer
		declare := func(c string) {
			decl.WriteString(":")
			decl.WriteString(c)
			decl.WriteString(" - [0:0]\n")
		}
		rule := func(c, r string) {
			rules.WriteString("-A ")
			rules.WriteString(c)
			rules.WriteByte(' ')
			rules.WriteString(r)
			rules.WriteByte('\n')
		}
		own := func(c iptChain) {
			declare(c.name)
			for _, rl := range c.rules {
				rule(c.name, rl)
			}
		}
		if full {
			fixed := static.filterChains
			if table == iptTableNAT {
				fixed = static.natChains
			}
			for _, c := range fixed {
				own(c)
			}
		}
		for _, s := range slots {
			if iptSlots[s].table != table {
				continue
			}
			c := iptSlots[s].chain
			declare(c)
			for _, rl := range static.head[s] {
				rule(c, rl)
			}
			for _, name := range names {
				if rd := render(name); rd != nil {
					for _, rl := range rd.shared[s] {
						rule(c, rl)
					}
				}
			}
			for _, rl := range static.tail[s] {
				rule(c, rl)
			}
		}
		if table == iptTableNAT {
			for _, c := range chains {
				own(c)
			}
			for _, c := range deleted {
				declare(c)
				rules.WriteString("-X " + c + "\n")
			}
		}
		if decl.Len() == 0 {
			continue
		}
		buf.WriteString("*" + table + "\n")
		buf.Write(decl.Bytes())
		buf.Write(rules.Bytes())
		buf.WriteString("COMMIT\n")
	}
	return buf.Bytes()
}

func (b *iptBackend) result() syncResult {
	res := syncResult{rules: b.staticRules, elementsBy: map[string]int{}}
	for _, byFam := range b.renders {
		for _, rd := range byFam {
			res.rules += rd.rules()
			res.noLocal += rd.noLocal
		}
	}
	return res
}

// iptExec is the real iptables of one family: go-iptables for the jumps,
// the listing and the version, and the matching iptables-restore binary of
// the same variant (legacy or nft) for the batches.
type iptExec struct {
	ipt         *iptables.IPTables
	restorePath string   // iptables-restore / ip6tables-restore of the variant
	wait        []string // restore's lock-wait flag, if supported
}

func newIPTExec(f family, cmds xtables.Tools) (*iptExec, error) {
	proto := iptables.ProtocolIPv4
	if f == v6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(cmds.IPTables), iptables.Timeout(5))
	if err != nil {
		return nil, err
	}
	x := &iptExec{ipt: ipt, restorePath: cmds.Restore}
	// iptables-restore takes --wait since 1.6.2.
	if v1, v2, v3 := ipt.GetIptablesVersion(); v1 > 1 || (v1 == 1 && (v2 > 6 || (v2 == 6 && v3 >= 2))) {
		x.wait = []string{"-w", "5"}
	}
	// Fail now, not at the first sync, if the kernel lacks the tables.
	if _, err := ipt.ListChains(iptTableNAT); err != nil {
		return nil, err
	}
	return x, nil
}

func (x *iptExec) randomFully() bool { return x.ipt.HasRandomFully() }

func (x *iptExec) listChains(table string) ([]string, error) { return x.ipt.ListChains(table) }

func (x *iptExec) chainExists(table, chain string) (bool, error) {
	return x.ipt.ChainExists(table, chain)
}

func (x *iptExec) ensureJumps(jumps []iptJump) error {
	// Inserting at the top in reverse order leaves them in list order.
	for i := len(jumps) - 1; i >= 0; i-- {
		j := jumps[i]
		ok, err := x.ipt.Exists(j.table, j.chain, j.args...)
		if err != nil {
			return fmt.Errorf("checking the jump from %s %s: %w", j.table, j.chain, err)
		}
		if !ok {
			if err := x.ipt.Insert(j.table, j.chain, 1, j.args...); err != nil {
				return fmt.Errorf("adding the jump from %s %s: %w", j.table, j.chain, err)
			}
		}
	}
	return nil
}

var restoreFailedLine = regexp.MustCompile(`line:? (\d+)`)

func (x *iptExec) restore(ctx context.Context, data []byte) error {
	// Generous: a batch of 300,000 rules takes minutes (kube-proxy's
	// iptables mode at 10,000 Services); the wait flag bounds lock waits.
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, x.restorePath, append([]string{"--noflush"}, x.wait...)...)
	cmd.Stdin = bytes.NewReader(data)
	out, err := cmd.CombinedOutput()
	if err == nil {
		return nil
	}
	msg := strings.TrimSpace(string(out))
	// iptables-restore names the failing line (often of a COMMIT):
	// quote the lines before it, which is where the problem usually is.
	if m := restoreFailedLine.FindStringSubmatch(msg); m != nil {
		if n, perr := strconv.Atoi(m[1]); perr == nil {
			msg += "; input around line " + m[1] + ":\n" + linesAround(data, n, 3)
		}
	}
	return fmt.Errorf("%s (%d bytes): %w: %s", x.restorePath, len(data), err, msg)
}

// linesAround returns lines n-before..n (1-based) of data.
func linesAround(data []byte, n, before int) string {
	lines := strings.Split(string(data), "\n")
	lo := max(n-1-before, 0)
	hi := min(n, len(lines))
	if lo >= hi {
		return ""
	}
	var b strings.Builder
	for i := lo; i < hi; i++ {
		fmt.Fprintf(&b, "%6d  %s\n", i+1, lines[i])
	}
	return b.String()
}

// removeAll deletes knit's jumps and chains from this family's tables, and
// nothing else. Not used on shutdown (the rules outlive knit, so that
// traffic keeps flowing across a restart); for switching backends and for
// tests.
func (x *iptExec) removeAll(ctx context.Context) error {
	chainsOf := map[string][]string{}
	for _, table := range []string{iptTableMangle, iptTableFilter, iptTableNAT} {
		chains, err := x.ipt.ListChains(table)
		if err != nil {
			return err
		}
		chainsOf[table] = chains
	}
	for _, j := range iptJumps {
		// iptables cannot even check for a jump to a missing chain.
		if !slices.Contains(chainsOf[j.table], j.args[len(j.args)-1]) {
			continue
		}
		if err := x.ipt.DeleteIfExists(j.table, j.chain, j.args...); err != nil {
			return fmt.Errorf("deleting the jump from %s %s: %w", j.table, j.chain, err)
		}
	}
	var buf bytes.Buffer
	for _, table := range []string{iptTableMangle, iptTableFilter, iptTableNAT} {
		chains := chainsOf[table]
		var decl, del bytes.Buffer
		for _, c := range chains {
			if proxyChain(c) {
				fmt.Fprintf(&decl, ":%s - [0:0]\n", c)
				fmt.Fprintf(&del, "-X %s\n", c)
			}
		}
		if decl.Len() > 0 {
			buf.WriteString("*" + table + "\n")
			buf.Write(decl.Bytes())
			buf.Write(del.Bytes())
			buf.WriteString("COMMIT\n")
		}
	}
	if buf.Len() == 0 {
		return nil
	}
	return x.restore(ctx, buf.Bytes())
}
