package dns

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"time"

	"sigs.k8s.io/knftables"
)

// The restart guard: cluster DNS lives in the agent process, on this
// node's own copy of the DNS Service IP, so while the agent restarts (a
// DaemonSet rollout, a crash) nothing is bound there and the kernel answers
// a query with ICMP port unreachable (UDP) or a reset (TCP). glibc's stub
// resolver gives up at once on that ("Temporary failure in name
// resolution"). The guard, one nftables table of its own, drops those
// packets instead, so the client's resolver retries after its timeout (and
// musl's after 1 s) and reaches the restarted server. Queries to a bound
// socket are never touched.
//
//	table inet knit-dns
//	  set serving-v4/-v6 { address . port; timeout 10m, refreshed while DNS runs }
//	  chain input (filter, input hook, priority -10):
//	    daddr . dport @serving, a socket takes it   accept
//	    daddr . dport @serving, no socket           drop   (TCP: SYNs only)
//
// The sets time out, so DNS turned off for good stops being guarded within
// minutes; `knit uninstall` deletes the table. Where the kernel has no
// socket expression (before Linux 4.18) no guard is installed.
const (
	guardTable        = "knit-dns"
	guardChain        = "input"
	guardTimeout      = 10 * time.Minute
	guardRefreshEvery = guardTimeout / 4
)

// guard programs the restart guard table for the addresses DNS serves.
type guard struct {
	nft   knftables.Interface
	addrs []netip.AddrPort // specific (not unspecified) bound addresses
}

func newGuard(nft knftables.Interface, bound []netip.AddrPort) *guard {
	g := &guard{nft: nft}
	for _, ap := range bound {
		if !ap.Addr().IsUnspecified() && ap.Port() != 0 {
			g.addrs = append(g.addrs, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		}
	}
	return g
}

func guardSet(v6 bool) string {
	if v6 {
		return "serving-v6"
	}
	return "serving-v4"
}

// transaction installs (or refreshes) the table. It is idempotent.
func (g *guard) transaction() *knftables.Transaction {
	tx := g.nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("knit dns: queries wait, rather than fail, while the agent restarts")})
	timeout := guardTimeout
	tx.Add(&knftables.Chain{Name: guardChain, Type: knftables.PtrTo(knftables.FilterType),
		Hook: knftables.PtrTo(knftables.InputHook), Priority: knftables.PtrTo(knftables.BaseChainPriority("-10"))})
	tx.Flush(&knftables.Chain{Name: guardChain})
	for _, v6 := range []bool{false, true} {
		set, ip, typ := guardSet(v6), "ip", "ipv4_addr . inet_service"
		if v6 {
			ip, typ = "ip6", "ipv6_addr . inet_service"
		}
		tx.Add(&knftables.Set{Name: set, Type: typ, Flags: []knftables.SetFlag{knftables.TimeoutFlag},
			Timeout: &timeout, Comment: knftables.PtrTo("cluster DNS addresses, refreshed while DNS runs")})
		for _, l4 := range []string{"udp", "tcp"} {
			match := fmt.Sprintf("%s daddr . %s dport @%s ", ip, l4, set)
			if l4 == "tcp" {
				match = "tcp flags & (fin | syn | rst | ack) == syn " + match
			}
			for _, transparent := range []string{"0", "1"} {
				tx.Add(&knftables.Rule{Chain: guardChain, Rule: match + "socket transparent " + transparent + " accept"})
			}
			tx.Add(&knftables.Rule{Chain: guardChain, Rule: match + "drop",
				Comment: knftables.PtrTo("no DNS socket: the agent is restarting")})
		}
		// Flush and add again: adding an element that exists would not
		// restart its timeout.
		tx.Flush(&knftables.Set{Name: set})
	}
	for _, ap := range g.addrs {
		tx.Add(&knftables.Element{Set: guardSet(ap.Addr().Is6()), Key: []string{ap.Addr().String(), strconv.Itoa(int(ap.Port()))}})
	}
	return tx
}

// install applies the table.
func (g *guard) install(ctx context.Context) error {
	if len(g.addrs) == 0 {
		return nil
	}
	return g.nft.Run(ctx, g.transaction())
}

// keep refreshes the guard until ctx ends; a failure is logged and counted,
// never fatal: DNS serves either way.
func (g *guard) keep(ctx context.Context, log *slog.Logger, failed func()) {
	t := time.NewTicker(guardRefreshEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := g.install(ctx); err != nil && ctx.Err() == nil {
				failed()
				log.Warn("dns restart guard refresh failed", "err", err)
			}
		}
	}
}
