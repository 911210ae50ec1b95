package overlay

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"

	"sigs.k8s.io/knftables"
)

// The overlay's nftables table. knit's proxy has its own table; the two
// never touch each other's rules.
const (
	nftTable = "knit-overlay"
	nftChain = "postrouting"
)

// Egress masquerade, in one NAT chain hooked at postrouting:
//
//	packet leaving the node
//	  |
//	  +- UDP to the VXLAN port, sent by this node ---------> return (never NAT a tunnel packet)
//	  +- from a pod, to a pod (cluster CIDR -> cluster CIDR) -> return (pod IPs are end to end)
//	  +- from a pod, to multicast --------------------------> return
//	  +- from a pod, to anywhere else ----------------------> masquerade to the node IP
//
// NAT chains only see the first packet of each connection; conntrack does
// the rest, so the cost of these rules does not grow with traffic.
//
// The first rule is the overlay's half of avoiding the VXLAN checksum bug
// (see ensureDevice): an encapsulated packet's source is the node IP, so the
// pod-source rules below could not match it anyway, but the explicit rule
// keeps it that way if someone ever widens them. It matches on the port and
// on "the source is one of this node's addresses", not on a mark, because a
// mark set on the inner packet survives encapsulation, which is precisely
// how kube-proxy NATed VXLAN packets a second time (kubernetes #88986).

// nftRule is one rule of the chain.
type nftRule struct {
	text    string
	comment string
}

// masqRules renders the chain's rules. The first rule's comment carries a
// hash of the whole ruleset, so a later sync (or a restarted agent) can tell
// the table already holds exactly this ruleset by listing the chain, and
// leave it untouched.
func masqRules(cfg *Config) []nftRule {
	rules := []nftRule{{
		text:    fmt.Sprintf("udp dport %d fib saddr type local return", cfg.Port),
		comment: "VXLAN packets this node sends are never NATed",
	}}
	for _, f := range families {
		var cidrs []netip.Prefix
		for _, c := range cfg.ClusterCIDRs {
			if familyOf(c.Addr()) == f {
				cidrs = append(cidrs, c)
			}
		}
		if len(cidrs) == 0 {
			continue
		}
		ip, multicast := "ip", "224.0.0.0/4"
		if f == v6 {
			ip, multicast = "ip6", "ff00::/8"
		}
		set := nftSet(cidrs)
		rules = append(rules,
			nftRule{fmt.Sprintf("%s saddr %s %s daddr %s return", ip, set, ip, set),
				"pod to pod: never masqueraded"},
			nftRule{fmt.Sprintf("%s saddr %s %s daddr %s return", ip, set, ip, multicast),
				"pod to multicast: not masqueraded"},
			nftRule{fmt.Sprintf("%s saddr %s masquerade fully-random", ip, set),
				"pod to outside the cluster: masquerade to the node IP"},
		)
	}
	h := sha256.New()
	for _, r := range rules {
		fmt.Fprintf(h, "%s\x00%s\x00", r.text, r.comment)
	}
	rules[0].comment = "knit-overlay " + hex.EncodeToString(h.Sum(nil))[:16] + ": " + rules[0].comment
	return rules
}

func nftSet(p []netip.Prefix) string {
	if len(p) == 1 {
		return p[0].String()
	}
	s := make([]string, len(p))
	for i := range p {
		s[i] = p[i].String()
	}
	return "{ " + strings.Join(s, ", ") + " }"
}

// masq keeps the overlay's nftables table in the rendered state.
type masq struct {
	nft     knftables.Interface
	applied string // marker comment of the ruleset last applied or found; "" unknown
}

// sync applies the ruleset if the table does not already hold it. With
// verify false and an unchanged ruleset it trusts memory; with verify true
// (timer resyncs, first sync, after a failure) it lists the chain. It
// reports whether it changed anything.
func (m *masq) sync(ctx context.Context, cfg *Config, verify bool) (bool, error) {
	if !cfg.Masquerade {
		return m.remove(ctx, verify)
	}
	rules := masqRules(cfg)
	marker := rules[0].comment
	if marker == m.applied && !verify {
		return false, nil
	}
	if have, err := m.nft.ListRules(ctx, nftChain); err == nil && len(have) == len(rules) &&
		have[0].Comment != nil && *have[0].Comment == marker {
		m.applied = marker
		return false, nil
	}

	// One transaction: the table and chain are created if missing, the chain
	// is flushed and refilled. nft applies it atomically, so no packet ever
	// sees a half-written chain. Only our own table is touched.
	tx := m.nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("knit overlay: egress masquerade of pod traffic")})
	tx.Add(&knftables.Chain{
		Name:     nftChain,
		Type:     knftables.PtrTo(knftables.NATType),
		Hook:     knftables.PtrTo(knftables.PostroutingHook),
		Priority: knftables.PtrTo(knftables.SNATPriority),
	})
	tx.Flush(&knftables.Chain{Name: nftChain})
	for _, r := range rules {
		tx.Add(&knftables.Rule{Chain: nftChain, Rule: r.text, Comment: knftables.PtrTo(r.comment)})
	}
	m.applied = ""
	if err := m.nft.Run(ctx, tx); err != nil {
		return false, fmt.Errorf("nftables %s: %w", nftTable, err)
	}
	m.applied = marker
	return true, nil
}

// remove deletes the table when masquerading was turned off.
func (m *masq) remove(ctx context.Context, verify bool) (bool, error) {
	const gone = "removed"
	if m.applied == gone && !verify {
		return false, nil
	}
	if _, err := m.nft.ListRules(ctx, ""); knftables.IsNotFound(err) {
		m.applied = gone
		return false, nil
	}
	tx := m.nft.NewTransaction()
	tx.Delete(&knftables.Table{})
	if err := m.nft.Run(ctx, tx); err != nil && !knftables.IsNotFound(err) {
		return false, fmt.Errorf("delete nftables table %s: %w", nftTable, err)
	}
	m.applied = gone
	return true, nil
}
