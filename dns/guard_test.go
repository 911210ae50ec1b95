package dns

import (
	"context"
	"log/slog"
	"net/netip"
	"testing"

	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/restartguard"
)

// guardGolden is the guard table for a dual-stack cluster DNS, as a serving
// DNS leaves it.
const guardGolden = `add table inet knit-dns { comment "knit dns: queries wait, rather than fail, while the agent restarts" ; }
add chain inet knit-dns input { type filter hook input priority -10 ; }
add set inet knit-dns serving-v4 { type ipv4_addr . inet_service ; flags timeout ; timeout 600s ; comment "cluster DNS addresses, refreshed while DNS runs" ; }
add set inet knit-dns serving-v6 { type ipv6_addr . inet_service ; flags timeout ; timeout 600s ; comment "cluster DNS addresses, refreshed while DNS runs" ; }
add rule inet knit-dns input ip daddr . udp dport @serving-v4 socket transparent 0 accept
add rule inet knit-dns input ip daddr . udp dport @serving-v4 socket transparent 1 accept
add rule inet knit-dns input ip daddr . udp dport @serving-v4 drop comment "no DNS socket: the agent is restarting"
add rule inet knit-dns input tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @serving-v4 socket transparent 0 accept
add rule inet knit-dns input tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @serving-v4 socket transparent 1 accept
add rule inet knit-dns input tcp flags & (fin | syn | rst | ack) == syn ip daddr . tcp dport @serving-v4 drop comment "no DNS socket: the agent is restarting"
add rule inet knit-dns input ip6 daddr . udp dport @serving-v6 socket transparent 0 accept
add rule inet knit-dns input ip6 daddr . udp dport @serving-v6 socket transparent 1 accept
add rule inet knit-dns input ip6 daddr . udp dport @serving-v6 drop comment "no DNS socket: the agent is restarting"
add rule inet knit-dns input tcp flags & (fin | syn | rst | ack) == syn ip6 daddr . tcp dport @serving-v6 socket transparent 0 accept
add rule inet knit-dns input tcp flags & (fin | syn | rst | ack) == syn ip6 daddr . tcp dport @serving-v6 socket transparent 1 accept
add rule inet knit-dns input tcp flags & (fin | syn | rst | ack) == syn ip6 daddr . tcp dport @serving-v6 drop comment "no DNS socket: the agent is restarting"
add element inet knit-dns serving-v4 { 10.43.0.10 . 53 }
add element inet knit-dns serving-v6 { fd43::a . 53 }
`

// TestGuard: DNS's parameters give the knit-dns table (the mechanism and
// its life are tested in internal/restartguard).
func TestGuard(t *testing.T) {
	nft := knftables.NewFake(knftables.InetFamily, guardTable)
	g := restartguard.New(nft, guardSpec, slog.New(slog.DiscardHandler), []netip.AddrPort{
		netip.MustParseAddrPort("10.43.0.10:53"), netip.MustParseAddrPort("[fd43::a]:53"),
		netip.MustParseAddrPort("0.0.0.0:5353"), // unspecified: not knit's own address, not guarded
	})
	for range 2 { // idempotent: a refresh leaves the same table
		if err := g.Install(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if got := nft.Dump(); got != guardGolden {
		t.Errorf("guard table:\n%s\nwant:\n%s", got, guardGolden)
	}
}
