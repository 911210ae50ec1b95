package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/knftables"
)

// state is the desired state a backend programs: the sync goroutine owns
// it, backends only read it.
type state struct {
	services  map[types.NamespacedName]*serviceInfo
	endpoints map[types.NamespacedName]portEndpoints
	topo      topology
	static    *staticConfig
}

// syncResult is what a sync reports for metrics.
type syncResult struct {
	rules, elements int
	// elementsBy counts elements per map/set.
	elementsBy map[string]int
	noLocal    int
}

// staleChainDelay: a chain can only be deleted once nothing references it,
// and on kernels before 6.2 a map element's reference is released a moment
// after the element is deleted. So removed chains are flushed at once and
// deleted by a later sync (kube-proxy does the same).
const staleChainDelay = time.Second

// nftBackend renders the state into the knit-proxy table.
//
// It remembers what it applied: the render of every Service and the owner
// of every map/set element. A partial sync re-renders only the changed
// Services and sends the difference; a full sync sends everything in one
// transaction that replaces the table's contents atomically (chains and
// maps are flushed and refilled inside the transaction, so there is no
// moment without rules, and no lookup of what is in the kernel other than
// the names of chains and sets, to find leftovers).
type nftBackend struct {
	nft knftables.Interface
	// lister, if set, lists object names (over netlink: much faster).
	lister knftables.Interface
	log    *slog.Logger

	// applied state, valid once a full sync succeeded (and since no full
	// sync failed: a full sync drops the old state first).
	valid   bool
	renders map[types.NamespacedName]*svcRender
	// applied: element id -> the element in the kernel and the Service
	// whose claim it is. conflicts: for the rare id that more than one
	// Service claims (the same externalIP, say), every claim; the first
	// claimant in name order owns the element (see winner).
	applied   map[elemID]owned
	conflicts map[elemID][]owned
	// stale: service chains flushed and waiting to be deleted.
	stale map[string]time.Time
	// pickUsers counts the Service ports using each shared pick chain; a
	// chain is in the kernel while its count is above zero.
	pickUsers map[string]int
	// Kept up to date so that a partial sync's metrics cost nothing per
	// Service: elements in the kernel per map or set, rules and
	// no-local-endpoint ports of all renders.
	counts          map[string]int
	svcRules, noLoc int
	// resetBaseChains: the first full sync of a process deletes and
	// re-creates the base chains in its transaction so that a new version
	// may change their hook or priority.
	resetBaseChains bool
	staticRules     int
	staticElems     []element
}

// owned is an element and the render of the Service that claims it (nil
// for the table's fixed elements). It points into the render, which never
// changes once made: the backend holds each element once.
type owned struct {
	el *element
	rd *svcRender
}

// svc is the claiming Service's name; zero for a fixed element.
func (o owned) svc() types.NamespacedName {
	if o.rd == nil {
		return types.NamespacedName{}
	}
	return o.rd.name
}

func newNFTBackend(nft knftables.Interface, log *slog.Logger) *nftBackend {
	return &nftBackend{
		nft:             nft,
		log:             log,
		renders:         map[types.NamespacedName]*svcRender{},
		applied:         map[elemID]owned{},
		conflicts:       map[elemID][]owned{},
		stale:           map[string]time.Time{},
		pickUsers:       map[string]int{},
		counts:          map[string]int{},
		resetBaseChains: true,
	}
}

// listAll returns the names of the table's objects by type ("chain",
// "set", "map"); a missing table is empty. It asks over netlink when it can:
// nft's own listing prints the whole table (seconds at 10,000 Services).
func (b *nftBackend) listAll(ctx context.Context) (map[string][]string, error) {
	if b.lister != nil {
		// The netlink lister fails on a missing table with an error that
		// only says "no such file or directory" in its text; chains are
		// listed per family, so no chain of ours means no table yet.
		if chains, err := b.lister.List(ctx, "chain"); err == nil && len(chains) == 0 {
			return map[string][]string{}, nil
		}
		all, err := b.lister.ListAll(ctx)
		if err == nil || knftables.IsNotFound(err) {
			return all, nil
		}
		b.log.Warn("listing the table over netlink failed; using nft", "err", err)
	}
	all, err := b.nft.ListAll(ctx)
	if err != nil && !knftables.IsNotFound(err) {
		return nil, fmt.Errorf("list table: %w", err)
	}
	return all, nil
}

// rendererFor returns the render settings of one sync.
func rendererFor(st *state) *renderer {
	return &renderer{masqMark: st.static.masqMark, clusterCIDRs: st.static.clusterCIDRs, topo: st.topo, nodeIPs: st.static.nodeIPs}
}

// deleteStale deletes chains flushed at least staleChainDelay ago, in a
// transaction of its own: if it fails, nothing else is lost, and the next
// full sync finds the chains again.
func (b *nftBackend) deleteStale(ctx context.Context, now time.Time) (pending bool) {
	tx := b.nft.NewTransaction()
	n := 0
	for name, t := range b.stale {
		if now.Sub(t) >= staleChainDelay {
			tx.Delete(&knftables.Chain{Name: name})
			delete(b.stale, name)
			n++
		}
	}
	if n > 0 {
		if err := b.nft.Run(ctx, tx); err != nil {
			b.log.Warn("deleting stale chains failed; a later full sync retries", "chains", n, "err", err)
		}
	}
	return len(b.stale) > 0
}

// sync programs st. changed lists the Services to re-render in a partial
// sync; full re-renders and re-sends everything.
func (b *nftBackend) sync(ctx context.Context, st *state, changed map[types.NamespacedName]bool, full bool) (syncResult, error) {
	now := time.Now()
	b.deleteStale(ctx, now)
	if full || !b.valid {
		return b.fullSync(ctx, st, rendererFor(st), now)
	}
	return b.partialSync(ctx, st, rendererFor(st), changed, now)
}

func (b *nftBackend) fullSync(ctx context.Context, st *state, r *renderer, now time.Time) (syncResult, error) {
	// Names of chains, sets and maps already in the table, to remove
	// leftovers (of removed Services, or from before a restart). A missing
	// table is simply empty.
	existing, err := b.listAll(ctx)
	if err != nil {
		return syncResult{}, err
	}

	// A full sync needs nothing of what was applied but the stale chains:
	// dropping the old renders and elements now, rather than when the new
	// ones replace them, keeps them out of the sync's peak memory. Until
	// this sync succeeds, every sync is a full one.
	b.valid = false
	b.renders, b.applied, b.conflicts, b.staticElems = map[types.NamespacedName]*svcRender{}, map[elemID]owned{}, map[elemID][]owned{}, nil

	renders := make(map[types.NamespacedName]*svcRender, len(st.services))
	names := sortedNames(st.services)
	n := 0
	for _, name := range names {
		rd := r.renderService(name, st.services[name], st.endpoints[name])
		renders[name] = rd
		n += len(rd.elements)
	}
	applied := make(map[elemID]owned, n+16)
	conflicts := map[elemID][]owned{}
	ids := make([]elemID, 0, n)
	for _, name := range names {
		rd := renders[name]
		for i := range rd.elements {
			o := owned{el: &rd.elements[i], rd: rd}
			id := o.el.id()
			if prev, ok := applied[id]; ok {
				if conflicts[id] == nil {
					conflicts[id] = []owned{prev}
				}
				conflicts[id] = append(conflicts[id], o)
				continue
			}
			applied[id] = o
			ids = append(ids, id)
		}
	}
	for id, cl := range conflicts {
		applied[id] = b.winner(id, cl)
	}
	picks := map[string]chain{}
	pickUsers := map[string]int{}
	for _, name := range names {
		for _, pc := range renders[name].picks {
			if _, ok := picks[pc.name()]; !ok {
				picks[pc.name()] = pc.chain()
			}
			pickUsers[pc.name()]++
		}
	}
	pickNames := slices.Sorted(maps.Keys(picks))
	sets, maps := staticSets()
	static, staticElems := staticChains(st.static)

	// Phase 1: create every table object that is missing, empty. Harmless
	// (nothing refers to a new object yet), and it lets phase 2 refer to
	// objects by name: the kernel resolves a reference to an object created
	// in the same transaction by walking the transaction, which is
	// quadratic at 10,000 Services.
	tx := b.nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("knit service proxy")})
	for _, o := range sets {
		tx.Add(o)
	}
	for _, o := range maps {
		tx.Add(o)
	}
	for _, c := range static {
		tx.Add(&knftables.Chain{Name: c.name})
	}
	desired := map[string]bool{}
	for _, pn := range pickNames {
		tx.Add(&knftables.Chain{Name: pn})
		desired[pn] = true
	}
	for _, name := range names {
		rd := renders[name]
		for i := range rd.sets {
			// Not flushed, ever: affinity sets hold the clients' current
			// endpoints. "add" updates a changed timeout.
			tx.Add(rd.sets[i].object())
			desired[rd.sets[i].name] = true
		}
		for i := range rd.maps {
			tx.Add(rd.maps[i].object())
			desired[rd.maps[i].name] = true
		}
		for _, c := range rd.chains {
			tx.Add(&knftables.Chain{Name: c.name})
			desired[c.name] = true
		}
	}
	if err := b.nft.Run(ctx, tx); err != nil {
		return syncResult{}, fmt.Errorf("nftables full sync, creating objects (%d operations): %w", tx.NumOperations(), err)
	}

	// Phase 2, one atomic transaction: replace the contents of everything.
	tx = b.nft.NewTransaction()
	for _, o := range sets {
		tx.Flush(o)
	}
	for _, o := range maps {
		tx.Flush(o)
	}
	if b.resetBaseChains {
		for _, bc := range baseChains {
			c := &knftables.Chain{Name: bc.name}
			tx.Add(c)
			tx.Delete(c)
		}
	}
	for _, bc := range baseChains {
		c := &knftables.Chain{Name: bc.name, Type: knftables.PtrTo(bc.typ), Hook: knftables.PtrTo(bc.hook), Priority: knftables.PtrTo(bc.priority)}
		tx.Add(c)
		tx.Flush(c)
	}
	for _, c := range static {
		tx.Flush(&knftables.Chain{Name: c.name})
	}
	for _, pn := range pickNames {
		tx.Flush(&knftables.Chain{Name: pn})
	}
	for _, name := range names {
		rd := renders[name]
		for _, c := range rd.chains {
			tx.Flush(&knftables.Chain{Name: c.name})
		}
		for i := range rd.maps {
			tx.Flush(rd.maps[i].object())
		}
	}
	// Leftover chains are flushed now and deleted later (see
	// staleChainDelay); leftover sets and maps go once nothing refers to
	// them, at the end of this transaction.
	for _, c := range existing["chain"] {
		if (isServiceObject(c) || isPickChain(c)) && !desired[c] {
			tx.Flush(&knftables.Chain{Name: c})
			if _, ok := b.stale[c]; !ok {
				b.stale[c] = now
			}
		}
	}
	staticRules := 0
	for _, bc := range baseChains {
		for _, rl := range bc.rules {
			tx.Add(&knftables.Rule{Chain: bc.name, Rule: rl})
			staticRules++
		}
	}
	for _, c := range static {
		staticRules += addRules(tx, c)
	}
	for _, pn := range pickNames {
		addRules(tx, picks[pn])
	}
	for _, name := range names {
		for _, c := range renders[name].chains {
			addRules(tx, c)
		}
	}
	// The elements, in a stable order (for tests and for reading): with
	// the nft binary written straight from the renders (bulkRunner), else
	// as knftables elements.
	elems := make([]*element, 0, len(staticElems)+len(ids))
	for i := range staticElems {
		el := &staticElems[i]
		elems = append(elems, el)
		applied[el.id()] = owned{el: el}
	}
	slices.SortFunc(ids, compareIDs)
	for _, id := range ids {
		elems = append(elems, applied[id].el)
	}
	bulk, isBulk := b.nft.(bulkRunner)
	tail := tx
	if isBulk {
		tail = b.nft.NewTransaction()
	} else {
		for _, el := range elems {
			tx.Add(el.object())
		}
	}
	for _, s := range existing["set"] {
		if isServiceObject(s) && !desired[s] {
			tail.Delete(&knftables.Set{Name: s})
		}
	}
	for _, m := range existing["map"] {
		if isServiceObject(m) && !desired[m] {
			tail.Delete(&knftables.Map{Name: m})
		}
	}
	if isBulk {
		err = bulk.runBulk(ctx, tx, elems, tail)
	} else {
		err = b.nft.Run(ctx, tx)
	}
	if err != nil {
		// The table's contents are as before. Forget what we think is
		// applied; the next sync is full again.
		clear(b.stale)
		ops := tx.NumOperations()
		if isBulk {
			ops += len(elems) + tail.NumOperations()
		}
		return syncResult{}, fmt.Errorf("nftables full sync (%d operations): %w", ops, err)
	}
	for c := range desired {
		delete(b.stale, c)
	}
	b.resetBaseChains = false
	b.valid = true
	b.staticRules = staticRules
	b.renders, b.applied, b.conflicts, b.staticElems = renders, applied, conflicts, staticElems
	b.pickUsers = pickUsers
	clear(b.counts)
	for _, o := range applied {
		b.counts[o.el.container]++
	}
	b.svcRules, b.noLoc = 0, 0
	for _, rd := range renders {
		b.addRenderCounts(rd, 1)
	}
	return b.result(), nil
}

func (b *nftBackend) partialSync(ctx context.Context, st *state, r *renderer, changed map[types.NamespacedName]bool, now time.Time) (syncResult, error) {
	tx := b.nft.NewTransaction()
	newRenders := make(map[types.NamespacedName]*svcRender, len(changed))
	touched := map[elemID]bool{}
	var flushed, deletedSets []string
	deletedMaps := map[string]bool{}
	var rewrite []chain
	pickDelta := map[string]int{}
	pickChains := map[string]chain{}
	for name := range changed {
		old := b.renders[name]
		var rd *svcRender
		if info := st.services[name]; info != nil {
			rd = r.renderService(name, info, st.endpoints[name])
		}
		newRenders[name] = rd
		if old != nil {
			for _, pc := range old.picks {
				pickDelta[pc.name()]--
			}
		}
		if rd != nil {
			for _, pc := range rd.picks {
				pickDelta[pc.name()]++
				pickChains[pc.name()] = pc.chain()
			}
		}
		oldChains := map[string][]rule{}
		oldSets := map[string]time.Duration{}
		oldMaps := map[string]bool{}
		if old != nil {
			for _, m := range old.maps {
				oldMaps[m.name] = true
			}
			for _, c := range old.chains {
				oldChains[c.name] = c.rules
			}
			for _, s := range old.sets {
				oldSets[s.name] = s.timeout
			}
			for _, el := range old.elements {
				touched[el.id()] = true
			}
		}
		if rd != nil {
			// An affinity set whose timeout changed is re-created (what
			// "add set" does to an existing set's timeout differs between
			// kernels). Its referencing rules, all in this Service's
			// chains, are flushed first, so every chain is rewritten.
			var recreate []*affinitySet
			for i := range rd.sets {
				if t, ok := oldSets[rd.sets[i].name]; ok && t != rd.sets[i].timeout {
					recreate = append(recreate, &rd.sets[i])
				}
			}
			for _, c := range rd.chains {
				prev, ok := oldChains[c.name]
				delete(oldChains, c.name)
				if ok && slices.Equal(prev, c.rules) && len(recreate) == 0 {
					continue
				}
				// Rules are added after every chain exists: a rule
				// may go to a chain of the same Service.
				tx.Add(&knftables.Chain{Name: c.name})
				tx.Flush(&knftables.Chain{Name: c.name})
				rewrite = append(rewrite, c)
				delete(b.stale, c.name)
			}
			// Chains the Service no longer has are flushed now, before
			// any set they refer to goes.
			flushOld(tx, oldChains, &flushed)
			for _, a := range recreate {
				tx.Delete(&knftables.Set{Name: a.name})
			}
			for i := range rd.sets {
				tx.Add(rd.sets[i].object())
				delete(oldSets, rd.sets[i].name)
			}
			for i := range rd.maps {
				if !oldMaps[rd.maps[i].name] {
					tx.Add(rd.maps[i].object())
				}
				delete(oldMaps, rd.maps[i].name)
			}
			for _, el := range rd.elements {
				touched[el.id()] = true
			}
		}
		flushOld(tx, oldChains, &flushed)
		for s := range oldSets {
			deletedSets = append(deletedSets, s)
		}
		for m := range oldMaps {
			deletedMaps[m] = true
		}
	}

	for _, c := range rewrite {
		addRules(tx, c)
	}
	// Shared pick chains: created with their first user, before the
	// elements that go to them; flushed when their last user goes, and
	// deleted later like a Service's chains.
	var flushedPicks []string
	for _, pn := range slices.Sorted(maps.Keys(pickDelta)) {
		before := b.pickUsers[pn]
		switch after := before + pickDelta[pn]; {
		case before == 0 && after > 0:
			tx.Add(&knftables.Chain{Name: pn})
			tx.Flush(&knftables.Chain{Name: pn})
			addRules(tx, pickChains[pn])
			delete(b.stale, pn)
		case before > 0 && after == 0:
			tx.Flush(&knftables.Chain{Name: pn})
			flushedPicks = append(flushedPicks, pn)
		}
	}

	// Elements: recompute the owner of every touched element.
	newClaims := map[elemID][]owned{}
	for id := range touched {
		var cl []owned
		if cs, ok := b.conflicts[id]; ok {
			for _, c := range cs {
				if !changed[c.svc()] {
					cl = append(cl, c)
				}
			}
		} else if cur, ok := b.applied[id]; ok && !changed[cur.svc()] {
			cl = []owned{cur}
		}
		newClaims[id] = cl
	}
	for _, rd := range newRenders {
		if rd == nil {
			continue
		}
		for i := range rd.elements {
			el := &rd.elements[i]
			newClaims[el.id()] = append(newClaims[el.id()], owned{el: el, rd: rd})
		}
	}
	newApplied := map[elemID]*owned{} // nil: deleted
	var adds []*element
	for id, cl := range newClaims {
		cur, inKernel := b.applied[id]
		if len(cl) == 0 {
			if inKernel {
				if !deletedMaps[cur.el.container] { // else it goes with its map
					tx.Delete(cur.el.object())
				}
				newApplied[id] = nil
			}
			continue
		}
		w := b.winner(id, cl)
		newApplied[id] = &w
		if inKernel && cur.el.value == w.el.value && cur.el.comment == w.el.comment {
			continue // the owner may change; the kernel need not
		}
		if inKernel {
			tx.Delete(cur.el.object())
		}
		adds = append(adds, w.el)
	}
	slices.SortFunc(adds, func(a, b *element) int { return compareIDs(a.id(), b.id()) })
	for _, el := range adds {
		tx.Add(el.object())
	}
	slices.Sort(deletedSets)
	for _, s := range deletedSets {
		tx.Delete(&knftables.Set{Name: s})
	}
	for _, m := range slices.Sorted(maps.Keys(deletedMaps)) {
		tx.Delete(&knftables.Map{Name: m})
	}
	if tx.NumOperations() > 0 {
		if err := b.nft.Run(ctx, tx); err != nil {
			return syncResult{}, fmt.Errorf("nftables partial sync (%d operations): %w", tx.NumOperations(), err)
		}
	}
	for _, c := range flushed {
		b.stale[c] = now
	}
	for _, pn := range flushedPicks {
		b.stale[pn] = now
	}
	for pn, d := range pickDelta {
		if n := b.pickUsers[pn] + d; n > 0 {
			b.pickUsers[pn] = n
		} else {
			delete(b.pickUsers, pn)
		}
	}
	for name, rd := range newRenders {
		b.addRenderCounts(b.renders[name], -1)
		b.addRenderCounts(rd, 1)
		if rd == nil {
			delete(b.renders, name)
		} else {
			b.renders[name] = rd
		}
	}
	for id, cl := range newClaims {
		if len(cl) > 1 {
			b.conflicts[id] = cl
		} else {
			delete(b.conflicts, id)
		}
	}
	for id, o := range newApplied {
		old, had := b.applied[id]
		switch {
		case o == nil:
			b.counts[old.el.container]--
			delete(b.applied, id)
		case !had:
			b.counts[o.el.container]++
			b.applied[id] = *o
		default:
			b.applied[id] = *o
		}
	}
	return b.result(), nil
}

// winner picks the claimant that owns an element: the first Service in
// name order. Two Services claiming one address and port is a user error
// (for example the same externalIP); it is logged, not fatal.
func (b *nftBackend) winner(id elemID, cl []owned) owned {
	w := cl[0]
	for _, c := range cl[1:] {
		if c.svc().String() < w.svc().String() {
			w = c
		}
	}
	if len(cl) > 1 {
		for _, c := range cl {
			if c.el.value != w.el.value {
				b.log.Warn("Services claim the same address and port; the first by name wins",
					"element", id.String(), "winner", w.svc().String(), "other", c.svc().String())
				break
			}
		}
	}
	return w
}

// result reports the applied table, from the counts kept up to date.
func (b *nftBackend) result() syncResult {
	res := syncResult{
		rules:      b.staticRules + len(b.pickUsers) + b.svcRules,
		elements:   len(b.applied),
		elementsBy: maps.Clone(b.counts),
		noLocal:    b.noLoc,
	}
	return res
}

// addRenderCounts adds (sign 1) or removes (-1) a render's rules and
// no-local-endpoint ports from the totals.
func (b *nftBackend) addRenderCounts(rd *svcRender, sign int) {
	if rd == nil {
		return
	}
	b.noLoc += sign * rd.noLocal
	for _, c := range rd.chains {
		b.svcRules += sign * len(c.rules)
	}
}

// flushOld flushes the chains left in old (a Service's chains it no longer
// has) and records them for deletion once unreferenced.
func flushOld(tx *knftables.Transaction, old map[string][]rule, flushed *[]string) {
	names := make([]string, 0, len(old))
	for c := range old {
		names = append(names, c)
	}
	slices.Sort(names)
	for _, c := range names {
		tx.Flush(&knftables.Chain{Name: c})
		delete(old, c)
	}
	*flushed = append(*flushed, names...)
}

func addRules(tx *knftables.Transaction, c chain) int {
	for _, rl := range c.rules {
		r := &knftables.Rule{Chain: c.name, Rule: rl.text}
		if rl.comment != "" {
			r.Comment = knftables.PtrTo(rl.comment)
		}
		tx.Add(r)
	}
	return len(c.rules)
}

func sortedNames[V any](m map[types.NamespacedName]V) []types.NamespacedName {
	names := make([]types.NamespacedName, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b types.NamespacedName) int {
		if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return names
}
