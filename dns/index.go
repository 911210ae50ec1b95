package dns

import (
	"sort"
	"sync"

	mdns "github.com/miekg/dns"
)

// index holds every name the server is authoritative for.
//
// Readers (the query path) see only names: lowercased wire-format name ->
// immutable *rnode holding responses packed ahead of time, one per record
// type. A lookup is one map access under a read lock and never allocates.
//
// The writer (the one sync goroutine) keeps its own bookkeeping: which owner
// (a Service, a Pod, the static zone records) contributed which records to
// which name, and how many names sit below each name, so that empty
// non-terminals ("ns.svc.cluster.local" when the namespace has Services)
// answer NODATA rather than NXDOMAIN (RFC 8020). When an owner changes, only
// the names whose records changed are repacked, and they are published in one
// short write-locked batch.
type index struct {
	mu    sync.RWMutex
	names map[string]*rnode

	// Writer side: only the sync goroutine touches these.
	nodes   map[string]*wnode
	contrib map[string][]nameRRs
	tops    []string // wire names where empty non-terminals stop
	dirty   map[string]struct{}
}

// rnode is what the query path sees of a name.
type rnode struct {
	answers []packedAnswer
	// cname is the target of an ExternalName Service ("" if none); such
	// a name answers every type but CNAME through a chase in the slow
	// path.
	cname string
	ttl   uint32
}

// entNode stands for a name that exists only because names below it do.
var entNode = &rnode{}

// packedAnswer is the full response (ID 0, no OPT) to one record type.
type packedAnswer struct {
	qtype uint16
	wire  []byte
	// alt is the same response without the additional section (SRV
	// glue), sent when wire does not fit; nil when there is none.
	alt []byte
}

func (n *rnode) answer(qtype uint16) *packedAnswer {
	for i := range n.answers {
		if n.answers[i].qtype == qtype {
			return &n.answers[i]
		}
	}
	return nil
}

// rrs returns the records of one type, unpacked from the answer (slow
// path only).
func (n *rnode) rrs(qtype uint16) []mdns.RR {
	a := n.answer(qtype)
	if a == nil {
		return nil
	}
	m := new(mdns.Msg)
	if err := m.Unpack(a.wire); err != nil {
		return nil
	}
	return m.Answer
}

// wnode is the writer's record of a name.
type wnode struct {
	name   string // presentation, lowercase FQDN
	owners []ownerRRs
	below  int  // record-bearing (owner, name) pairs strictly below
	stale  bool // owners changed since the last pack
	pub    *rnode
}

type ownerRRs struct {
	owner string
	rrs   []mdns.RR
}

// nameRRs is one name's records from one owner. rrs may be empty: the
// name then merely exists.
type nameRRs struct {
	key  string // wire name, lowercase
	name string // presentation name, lowercase FQDN
	rrs  []mdns.RR
}

func newIndex(tops []string) *index {
	return &index{
		names:   make(map[string]*rnode),
		nodes:   make(map[string]*wnode),
		contrib: make(map[string][]nameRRs),
		tops:    tops,
		dirty:   make(map[string]struct{}),
	}
}

// get returns the node of a lowercased wire name, or nil.
func (x *index) get(name []byte) *rnode {
	x.mu.RLock()
	n := x.names[string(name)]
	x.mu.RUnlock()
	return n
}

// len is the number of published names.
func (x *index) len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.names)
}

// set replaces everything owner contributes with recs (nil removes the
// owner). Changes take effect at commit.
func (x *index) set(owner string, recs []nameRRs) {
	old := x.contrib[owner]
	if len(old) == 0 && len(recs) == 0 {
		return
	}
	oldBy := make(map[string][]mdns.RR, len(old))
	for _, r := range old {
		oldBy[r.key] = r.rrs
	}
	changed := false
	seen := make(map[string]bool, len(recs))
	for _, r := range recs {
		seen[r.key] = true
		prev, had := oldBy[r.key]
		if had && rrsEqual(prev, r.rrs) {
			continue
		}
		changed = true
		n := x.node(r.key, r.name)
		n.setOwner(owner, r.rrs)
		x.touch(r.key, n)
		if !had {
			x.adjustAbove(r.key, +1)
		}
	}
	for _, r := range old {
		if seen[r.key] {
			continue
		}
		changed = true
		if n := x.nodes[r.key]; n != nil {
			n.removeOwner(owner)
			x.touch(r.key, n)
		}
		x.adjustAbove(r.key, -1)
	}
	if !changed {
		return
	}
	// SRV answers carry the target addresses as glue; when anything of
	// the owner changed, repack its SRV names too.
	for _, r := range recs {
		for _, rr := range r.rrs {
			if rr.Header().Rrtype == mdns.TypeSRV {
				if n := x.nodes[r.key]; n != nil {
					x.touch(r.key, n)
				}
				break
			}
		}
	}
	if len(recs) == 0 {
		delete(x.contrib, owner)
	} else {
		x.contrib[owner] = recs
	}
}

func (x *index) node(key, name string) *wnode {
	n := x.nodes[key]
	if n == nil {
		n = &wnode{name: name}
		x.nodes[key] = n
	}
	return n
}

func (x *index) touch(key string, n *wnode) {
	n.stale = true
	x.dirty[key] = struct{}{}
}

// adjustAbove counts a record name in (or out of) every ancestor up to the
// zone top.
func (x *index) adjustAbove(key string, d int) {
	for a := parentWire(key); a != ""; a = parentWire(a) {
		if x.isTop(a) {
			return
		}
		n := x.nodes[a]
		if n == nil {
			if d < 0 {
				continue
			}
			name, _, err := mdns.UnpackDomainName([]byte(a), 0)
			if err != nil {
				return
			}
			n = x.node(a, name)
		}
		n.below += d
		x.dirty[a] = struct{}{}
	}
}

func (x *index) isTop(key string) bool {
	for _, t := range x.tops {
		if key == t {
			return true
		}
	}
	return false
}

// parentWire strips the first label of a wire name ("" past the root).
func parentWire(key string) string {
	if len(key) <= 1 {
		return ""
	}
	i := 1 + int(key[0])
	if i >= len(key) {
		return ""
	}
	return key[i:]
}

func (n *wnode) setOwner(owner string, rrs []mdns.RR) {
	for i := range n.owners {
		if n.owners[i].owner == owner {
			n.owners[i].rrs = rrs
			return
		}
	}
	n.owners = append(n.owners, ownerRRs{owner: owner, rrs: rrs})
	sort.Slice(n.owners, func(i, j int) bool { return n.owners[i].owner < n.owners[j].owner })
}

func (n *wnode) removeOwner(owner string) {
	for i := range n.owners {
		if n.owners[i].owner == owner {
			n.owners = append(n.owners[:i], n.owners[i+1:]...)
			return
		}
	}
}

// commit repacks what changed since the last commit and publishes it in one
// write-locked batch. It returns the number of names published or removed.
func (x *index) commit() int {
	if len(x.dirty) == 0 {
		return 0
	}
	type pub struct {
		key string
		n   *rnode // nil: delete
	}
	pubs := make([]pub, 0, len(x.dirty))
	for key := range x.dirty {
		n := x.nodes[key]
		switch {
		case n == nil:
			pubs = append(pubs, pub{key, nil})
		case len(n.owners) == 0 && n.below <= 0:
			delete(x.nodes, key)
			pubs = append(pubs, pub{key, nil})
		case n.stale || n.pub == nil:
			n.pub = x.pack(n)
			n.stale = false
			pubs = append(pubs, pub{key, n.pub})
		}
	}
	clear(x.dirty)
	x.mu.Lock()
	for _, p := range pubs {
		if p.n == nil {
			delete(x.names, p.key)
		} else {
			x.names[p.key] = p.n
		}
	}
	x.mu.Unlock()
	return len(pubs)
}

// pack builds the published form of a name: every owner's records merged
// and deduplicated, one packed response per record type.
func (x *index) pack(n *wnode) *rnode {
	var all []mdns.RR
	for _, o := range n.owners {
		for _, rr := range o.rrs {
			dup := false
			for _, have := range all {
				if mdns.IsDuplicate(have, rr) {
					dup = true
					break
				}
			}
			if !dup {
				all = append(all, rr)
			}
		}
	}
	if len(all) == 0 {
		return entNode
	}
	out := &rnode{}
	byType := map[uint16][]mdns.RR{}
	var types []uint16
	for _, rr := range all {
		t := rr.Header().Rrtype
		if _, ok := byType[t]; !ok {
			types = append(types, t)
		}
		byType[t] = append(byType[t], rr)
		out.ttl = rr.Header().Ttl
		if c, ok := rr.(*mdns.CNAME); ok && out.cname == "" {
			out.cname = c.Target
		}
	}
	sort.Slice(types, func(i, j int) bool { return types[i] < types[j] })
	for _, t := range types {
		rrs := byType[t]
		if t == mdns.TypeCNAME && len(rrs) > 1 {
			rrs = rrs[:1] // a name has one CNAME at most (RFC 1034 3.6.2)
		}
		var glue []mdns.RR
		switch t {
		case mdns.TypeSRV:
			glue = x.glue(rrs, func(rr mdns.RR) string { return rr.(*mdns.SRV).Target })
		case mdns.TypeNS:
			glue = x.glue(rrs, func(rr mdns.RR) string { return rr.(*mdns.NS).Ns })
		}
		wire, err := packAnswer(n.name, t, rrs, nil)
		if err != nil {
			continue
		}
		pa := packedAnswer{qtype: t, wire: wire}
		if len(glue) > 0 {
			if full, err := packAnswer(n.name, t, rrs, glue); err == nil {
				pa.wire, pa.alt = full, wire
			}
		}
		out.answers = append(out.answers, pa)
	}
	return out
}

// glue returns the A/AAAA records of the targets of rrs, as the writer
// knows them.
func (x *index) glue(rrs []mdns.RR, target func(mdns.RR) string) []mdns.RR {
	var out []mdns.RR
	done := map[string]bool{}
	buf := make([]byte, maxName+1)
	for _, rr := range rrs {
		t := target(rr)
		if done[t] {
			continue
		}
		done[t] = true
		off, err := mdns.PackDomainName(t, buf, 0, nil, false)
		if err != nil {
			continue
		}
		tn := x.nodes[string(buf[:off])]
		if tn == nil {
			continue
		}
		for _, o := range tn.owners {
			for _, a := range o.rrs {
				if t := a.Header().Rrtype; t == mdns.TypeA || t == mdns.TypeAAAA {
					out = append(out, a)
				}
			}
		}
	}
	return out
}

// packAnswer packs an authoritative answer for (name, qtype) with ID 0.
func packAnswer(name string, qtype uint16, answer, extra []mdns.RR) ([]byte, error) {
	m := &mdns.Msg{
		MsgHdr:   mdns.MsgHdr{Response: true, Authoritative: true, RecursionAvailable: true},
		Question: []mdns.Question{{Name: name, Qtype: qtype, Qclass: mdns.ClassINET}},
		Answer:   answer,
		Extra:    extra,
		Compress: true,
	}
	return m.Pack()
}

func rrsEqual(a, b []mdns.RR) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !mdns.IsDuplicate(a[i], b[i]) || a[i].Header().Ttl != b[i].Header().Ttl {
			return false
		}
	}
	return true
}

// wireName converts a presentation name to a lowercase wire key.
func wireName(name string, buf []byte) (string, bool) {
	off, err := mdns.PackDomainName(name, buf, 0, nil, false)
	if err != nil {
		return "", false
	}
	for i := range buf[:off] {
		if c := buf[i]; 'A' <= c && c <= 'Z' {
			buf[i] = c + 'a' - 'A'
		}
	}
	return string(buf[:off]), true
}
