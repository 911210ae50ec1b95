package proxy

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"
)

// A compact nft interpreter for exactly the rule shapes render.go emits
// (kube-proxy's tracer in pkg/proxy/nftables/helpers_test.go does the same
// with regexps). Rules are split into space-separated tokens; each
// expression consumes its tokens and either fails the rule or lets it
// continue. An unknown token fails the test, so the tracer cannot silently
// drift from the renderer.

type packet struct {
	src, dst netip.Addr
	proto    string // tcp, udp, sctp
	dport    uint16
	mark     uint32
	dnatted  bool
}

type tracer struct {
	t       testing.TB
	table   *knftables.FakeTable
	local   []netip.Addr // this node's addresses (fib type local)
	matched []string
}

type verdict int

const (
	vContinue verdict = iota
	vAccept           // end of this hook's processing in our table
	vDrop
	vReject
	vReturn
	vDNAT
)

// outcome of a chain: the verdict, and DNAT destinations (all branches of a
// numgen are followed).
type outcome struct {
	v       verdict
	targets []string
}

func (tr *tracer) fail(rule, msg string) {
	tr.t.Helper()
	tr.t.Fatalf("tracer: %s in rule %q", msg, rule)
}

// runChain evaluates chain for p. It returns the first terminal verdict.
func (tr *tracer) runChain(name string, p *packet) outcome {
	ch := tr.table.Chains[name]
	if ch == nil {
		tr.t.Fatalf("tracer: no chain %q", name)
	}
	// forks: DNAT targets of rules that match only with some probability
	// ("numgen random mod K 0 ..."): the tracer follows both ways.
	var forks []string
	for _, r := range ch.Rules {
		rest, ok := strings.CutPrefix(r.Rule, "numgen random mod ")
		if ok && strings.Fields(rest)[1] == "0" {
			o := tr.runRule(strings.Join(strings.Fields(rest)[2:], " "), p)
			if o.v != vDNAT {
				tr.t.Fatalf("tracer: probabilistic rule without DNAT: %q", r.Rule)
			}
			forks = append(forks, o.targets...)
			continue
		}
		o := tr.runRule(r.Rule, p)
		switch o.v {
		case vContinue:
			continue
		case vReturn:
			return outcome{v: vContinue}
		default:
			if len(forks) > 0 {
				o.targets = append(forks, o.targets...)
			}
			return o
		}
	}
	if len(forks) > 0 {
		return outcome{v: vDNAT, targets: forks}
	}
	return outcome{v: vContinue}
}

func (tr *tracer) runRule(rule string, p *packet) outcome {
	toks := strings.Fields(rule)
	for len(toks) > 0 {
		ok, o, rest := tr.step(rule, toks, p)
		if !ok {
			return outcome{v: vContinue}
		}
		if o.v != vContinue {
			tr.matched = append(tr.matched, rule)
			return o
		}
		toks = rest
	}
	tr.matched = append(tr.matched, rule)
	return outcome{v: vContinue}
}

// step evaluates one expression or statement at the head of toks.
func (tr *tracer) step(rule string, toks []string, p *packet) (bool, outcome, []string) {
	cont := outcome{v: vContinue}
	switch {
	case has(toks, "ct", "state", "new"):
		return true, cont, toks[3:]
	case has(toks, "ct", "status", "dnat"):
		return p.dnatted, cont, toks[3:]
	case has(toks, "fib", "daddr", "type", "local"):
		return slices.Contains(tr.local, p.dst), cont, toks[4:]
	case has(toks, "fib", "saddr", "type", "local"):
		return slices.Contains(tr.local, p.src), cont, toks[4:]
	case has(toks, "mark", "and"):
		m := tr.num(rule, toks[2])
		if toks[3] != "!=" || toks[4] != "0" {
			tr.fail(rule, "unknown mark test")
		}
		return p.mark&m != 0, cont, toks[5:]
	case has(toks, "mark", "set", "mark", "or"):
		p.mark |= tr.num(rule, toks[4])
		return true, cont, toks[5:]
	case has(toks, "mark", "set", "mark", "xor"):
		p.mark ^= tr.num(rule, toks[4])
		return true, cont, toks[5:]
	case has(toks, "masquerade", "fully-random"):
		return true, outcome{v: vAccept, targets: []string{"MASQUERADE"}}, toks[2:]
	case has(toks, "update"):
		// update @set { ip saddr }: records affinity; no match effect.
		return true, cont, toks[6:]
	case has(toks, "reject"):
		return true, outcome{v: vReject}, nil
	case has(toks, "drop"):
		return true, outcome{v: vDrop}, nil
	case has(toks, "return"):
		return true, outcome{v: vReturn}, nil
	case has(toks, "jump") || has(toks, "goto"):
		o := tr.runChain(toks[1], p)
		if o.v == vContinue && toks[0] == "goto" {
			// After a goto, evaluation resumes in the caller of this
			// chain, not here: the same as a return.
			return true, outcome{v: vReturn}, nil
		}
		return true, o, toks[2:]
	case has(toks, "numgen", "random", "mod"):
		// numgen random mod N vmap @m: follow every index.
		var all outcome
		for _, v := range tr.indexed(rule, toks) {
			o := tr.runRule(v, p)
			all.v = o.v
			all.targets = append(all.targets, o.targets...)
		}
		return true, all, nil
	case has(toks, "meta", "l4proto") && len(toks) > 2 && toks[2] != ".":
		return p.proto == toks[2], cont, toks[3:]
	case has(toks, "dnat"):
		return true, tr.dnat(rule, toks, p), nil
	}
	return tr.match(rule, toks, p)
}

// match handles "<selector> [. <selector>...] <op>" expressions.
func (tr *tracer) match(rule string, toks []string, p *packet) (bool, outcome, []string) {
	var key []string
	for {
		sel, n := tr.selector(rule, toks, p)
		if n == 0 {
			tr.fail(rule, fmt.Sprintf("unknown expression at %q", strings.Join(toks, " ")))
		}
		if sel == "" {
			return false, outcome{}, nil // family mismatch
		}
		key = append(key, sel)
		toks = toks[n:]
		if len(toks) > 0 && toks[0] == "." {
			toks = toks[1:]
			continue
		}
		break
	}
	cont := outcome{v: vContinue}
	switch {
	case strings.HasPrefix(toks[0], "@"):
		return tr.inSet(toks[0][1:], key), cont, toks[1:]
	case toks[0] == "!=" && strings.HasPrefix(toks[1], "@"):
		return !tr.inSet(toks[1][1:], key), cont, toks[2:]
	case toks[0] == "vmap" && strings.HasPrefix(toks[1], "@"):
		el := tr.lookup(toks[1][1:], key)
		if el == nil {
			return false, outcome{}, nil
		}
		return true, tr.runRule(el.Value[0], p), nil
	case toks[0] == "!=" && toks[1] == "{":
		set, n := braced(rule, toks[1:])
		return !inAnon(key[0], set), cont, toks[1+n:]
	case toks[0] == "!=":
		return !inAnon(key[0], []string{toks[1]}), cont, toks[2:]
	case toks[0] == "{":
		set, n := braced(rule, toks)
		return inAnon(key[0], set), cont, toks[n:]
	}
	tr.fail(rule, "unknown operator "+toks[0])
	return false, outcome{}, nil
}

// selector returns the packet's value for the selector at the head of toks
// ("" when the family does not match) and how many tokens it used.
func (tr *tracer) selector(rule string, toks []string, p *packet) (string, int) {
	if len(toks) < 2 {
		return "", 0
	}
	switch toks[0] + " " + toks[1] {
	case "ip saddr", "ip daddr", "ip6 saddr", "ip6 daddr":
		a := p.src
		if toks[1] == "daddr" {
			a = p.dst
		}
		if (toks[0] == "ip") != a.Is4() {
			return "", 2
		}
		return a.String(), 2
	case "meta l4proto":
		return p.proto, 2
	case "th dport":
		return strconv.Itoa(int(p.dport)), 2
	case "tcp dport", "udp dport", "sctp dport":
		if toks[0] != p.proto {
			tr.fail(rule, "port of another protocol than the packet's")
		}
		return strconv.Itoa(int(p.dport)), 2
	}
	return "", 0
}

func (tr *tracer) dnat(rule string, toks []string, p *packet) outcome {
	// dnat ip to A:P | dnat ip addr . port to numgen random mod N map { 0 : A . P, ... }
	if (toks[1] == "ip") != p.dst.Is4() {
		tr.fail(rule, "dnat family differs from the packet's")
	}
	if toks[2] == "to" {
		return outcome{v: vDNAT, targets: []string{toks[3]}}
	}
	// dnat ip addr . port to [<selector> . ...] numgen random mod N map @m:
	// the key is the packet's selectors (if any), then the index.
	var prefix []string
	at := slices.Index(toks, "to") + 1
	for toks[at] != "numgen" {
		sel, n := tr.selector(rule, toks[at:], p)
		if n == 0 || sel == "" || toks[at+n] != "." {
			tr.fail(rule, "unknown dnat map key")
		}
		prefix = append(prefix, sel)
		at += n + 1
	}
	out := outcome{v: vDNAT}
	for _, v := range tr.indexed(rule, toks[at:], prefix...) {
		f := strings.Fields(v) // A . P
		out.targets = append(out.targets, netip.AddrPortFrom(netip.MustParseAddr(f[0]), uint16(tr.num(rule, f[2]))).String())
	}
	return out
}

// indexed returns the values at indexes 0..N-1 (after the key prefix) of
// the map named in "numgen random mod N (v)map @m": every choice numgen may
// make.
func (tr *tracer) indexed(rule string, toks []string, prefix ...string) []string {
	if len(toks) < 6 || (toks[4] != "map" && toks[4] != "vmap") {
		tr.fail(rule, "unknown numgen form")
	}
	n := tr.num(rule, toks[3])
	var out []string
	for i := range n {
		el := tr.lookup(strings.TrimPrefix(toks[5], "@"), append(slices.Clone(prefix), strconv.Itoa(int(i))))
		if el == nil {
			tr.fail(rule, fmt.Sprintf("no element %d", i))
		}
		out = append(out, el.Value[0])
	}
	return out
}

func (tr *tracer) inSet(name string, key []string) bool {
	s := tr.table.Sets[name]
	if s == nil {
		tr.t.Fatalf("tracer: no set %q", name)
	}
	if len(key) == 1 && slices.Contains(s.Flags, knftables.IntervalFlag) {
		for _, e := range s.Elements {
			if inAnon(key[0], e.Key) {
				return true
			}
		}
		return false
	}
	return s.FindElement(key...) != nil
}

func (tr *tracer) lookup(name string, key []string) *knftables.Element {
	m := tr.table.Maps[name]
	if m == nil {
		tr.t.Fatalf("tracer: no map %q", name)
	}
	return m.FindElement(key...)
}

func (tr *tracer) num(rule, s string) uint32 {
	n, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		tr.fail(rule, "bad number "+s)
	}
	return uint32(n)
}

func has(toks []string, words ...string) bool {
	if len(toks) < len(words) {
		return false
	}
	for i, w := range words {
		if toks[i] != w {
			return false
		}
	}
	return true
}

// braced returns the comma-separated items of "{ a, b }" at the head of
// toks, and how many tokens that took.
func braced(rule string, toks []string) ([]string, int) {
	if toks[0] != "{" {
		panic("tracer: expected { in " + rule)
	}
	end := slices.Index(toks, "}")
	var out []string
	for _, s := range strings.Split(strings.Join(toks[1:end], " "), ",") {
		out = append(out, strings.TrimSpace(s))
	}
	return out, end + 1
}

// inAnon: is addr in the anonymous set items (addresses or prefixes)?
func inAnon(addr string, items []string) bool {
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return slices.Contains(items, addr)
	}
	for _, it := range items {
		if p, err := netip.ParsePrefix(it); err == nil && p.Contains(a) {
			return true
		}
		if b, err := netip.ParseAddr(it); err == nil && a == b {
			return true
		}
	}
	return false
}

// flowResult is what happens to the first packet of a connection.
type flowResult struct {
	// out: "DROP", "REJECT", "ACCEPT" (untouched) or the DNAT targets
	// ("10.42.1.5:8080, 10.42.2.7:8080": every endpoint the random choice
	// may pick).
	out  string
	masq bool
	mark uint32 // the packet's mark when it leaves postrouting
}

// trace runs a connection's first packet through the table the way the
// kernel hooks do: packets from this node's own addresses take the output
// path, others prerouting; then filter input (DNATed to a local address) or
// forward; then nat postrouting for packets that leave.
func trace(t testing.TB, fake *knftables.Fake, local []netip.Addr, p packet) (flowResult, []string) {
	t.Helper()
	fake.RLock()
	defer fake.RUnlock()
	tr := &tracer{t: t, table: fake.Table, local: local}
	fromHost := slices.Contains(local, p.src)
	natChain, filterChain := chainNatPrerouting, chainFilterForward
	if fromHost {
		natChain, filterChain = chainNatOutput, chainFilterOutput
	}
	var res flowResult
	preChain := chainFilterPreDNAT
	if fromHost {
		preChain = chainFilterOutPre
	}
	if o := tr.runChain(preChain, &p); o.v == vDrop {
		return flowResult{out: "DROP"}, tr.matched
	}
	o := tr.runChain(natChain, &p)
	switch o.v {
	case vDNAT:
		res.out = strings.Join(o.targets, ", ")
		ap := netip.MustParseAddrPort(o.targets[0])
		p.dst, p.dport, p.dnatted = ap.Addr(), ap.Port(), true
	case vDrop, vReject:
		tr.t.Fatalf("tracer: nat chains never drop (%v)", o.v)
	}
	if !fromHost && slices.Contains(local, p.dst) {
		filterChain = chainFilterInput
	}
	switch o := tr.runChain(filterChain, &p); o.v {
	case vDrop:
		return flowResult{out: "DROP"}, tr.matched
	case vReject:
		return flowResult{out: "REJECT"}, tr.matched
	}
	if res.out == "" {
		res.out = "ACCEPT"
	}
	if filterChain == chainFilterInput {
		return res, tr.matched // delivered here, no postrouting
	}
	if o := tr.runChain(chainNatPostrouting, &p); o.v == vAccept && slices.Contains(o.targets, "MASQUERADE") {
		res.masq = true
	}
	res.mark = p.mark
	return res, tr.matched
}

type flowTest struct {
	name  string
	src   string
	proto string // default tcp
	dst   string
	port  uint16
	out   string
	masq  bool
}

func runFlowTests(t *testing.T, fake *knftables.Fake, tests []flowTest) {
	t.Helper()
	local := []netip.Addr{netip.MustParseAddr(nodeIP), netip.MustParseAddr(nodeIP6)}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			proto := tc.proto
			if proto == "" {
				proto = "tcp"
			}
			p := packet{src: netip.MustParseAddr(tc.src), dst: netip.MustParseAddr(tc.dst), proto: proto, dport: tc.port}
			res, matched := trace(t, fake, local, p)
			if res.out != tc.out || res.masq != tc.masq {
				t.Errorf("%s -> %s:%d/%s: got %q masq=%v, want %q masq=%v\nmatched rules:\n  %s",
					tc.src, tc.dst, tc.port, proto, res.out, res.masq, tc.out, tc.masq, strings.Join(matched, "\n  "))
			}
		})
	}
}
