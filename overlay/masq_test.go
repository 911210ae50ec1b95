package overlay

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"
)

func TestMasqGolden(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t, BackendVXLAN)
	nft := knftables.NewFake(knftables.InetFamily, nftTable)
	m := &masq{nft: nft}
	changed, err := m.sync(ctx, &cfg, true)
	if err != nil || !changed {
		t.Fatalf("first sync: changed=%v err=%v", changed, err)
	}
	marker := masqRules(&cfg)[0].comment
	want := strings.TrimSpace(`
add table inet knit-overlay { comment "knit overlay: egress masquerade of pod traffic" ; }
add chain inet knit-overlay postrouting { type nat hook postrouting priority 100 ; }
add rule inet knit-overlay postrouting udp dport 8472 fib saddr type local return comment "` + marker + `"
add rule inet knit-overlay postrouting ip saddr 10.42.0.0/16 ip daddr 10.42.0.0/16 return comment "pod to pod: never masqueraded"
add rule inet knit-overlay postrouting ip saddr 10.42.0.0/16 ip daddr 224.0.0.0/4 return comment "pod to multicast: not masqueraded"
add rule inet knit-overlay postrouting ip saddr 10.42.0.0/16 masquerade fully-random comment "pod to outside the cluster: masquerade to the node IP"
add rule inet knit-overlay postrouting ip6 saddr fd42::/56 ip6 daddr fd42::/56 return comment "pod to pod: never masqueraded"
add rule inet knit-overlay postrouting ip6 saddr fd42::/56 ip6 daddr ff00::/8 return comment "pod to multicast: not masqueraded"
add rule inet knit-overlay postrouting ip6 saddr fd42::/56 masquerade fully-random comment "pod to outside the cluster: masquerade to the node IP"
`)
	if got := strings.TrimSpace(nft.Dump()); got != want {
		t.Errorf("ruleset:\n%s\nwant:\n%s", got, want)
	}
	if !strings.HasPrefix(marker, "knit-overlay ") || len(marker) > knftables.CommentLengthMax {
		t.Errorf("marker comment %q", marker)
	}

	// Nothing changed: no transaction, whether verifying or not, and a fresh
	// masq (an agent restart) finds the ruleset in place too.
	last := nft.LastTransaction
	for _, mm := range []*masq{m, {nft: nft}} {
		for _, verify := range []bool{false, true} {
			if changed, err := mm.sync(ctx, &cfg, verify); changed || err != nil {
				t.Errorf("resync (verify=%v): changed=%v err=%v", verify, changed, err)
			}
		}
	}
	if nft.LastTransaction != last {
		t.Error("an unchanged ruleset was rewritten")
	}

	// Someone flushes our chain: a verifying sync restores it.
	tx := nft.NewTransaction()
	tx.Flush(&knftables.Chain{Name: nftChain})
	mustDo(t, nft.Run(ctx, tx))
	if changed, _ := m.sync(ctx, &cfg, false); changed {
		t.Error("non-verifying sync listed the kernel")
	}
	if changed, err := m.sync(ctx, &cfg, true); !changed || err != nil {
		t.Errorf("verifying sync after a flush: changed=%v err=%v", changed, err)
	}
	if got := strings.TrimSpace(nft.Dump()); got != want {
		t.Errorf("ruleset after restore:\n%s", got)
	}

	// Config change: new cluster CIDRs, new port; old rules replaced.
	cfg.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("10.50.0.0/16")}
	cfg.Port = 4789
	if changed, err := m.sync(ctx, &cfg, false); !changed || err != nil {
		t.Fatalf("sync after config change: changed=%v err=%v", changed, err)
	}
	dump := nft.Dump()
	for _, s := range []string{
		"udp dport 4789 fib saddr type local return",
		"ip saddr { 10.42.0.0/16, 10.50.0.0/16 } ip daddr { 10.42.0.0/16, 10.50.0.0/16 } return",
	} {
		if !strings.Contains(dump, s) {
			t.Errorf("ruleset lacks %q:\n%s", s, dump)
		}
	}
	if strings.Contains(dump, "ip6") || strings.Contains(dump, "8472") {
		t.Errorf("stale rules left:\n%s", dump)
	}

	// Masquerade turned off: our table goes.
	cfg.Masquerade = false
	if changed, err := m.sync(ctx, &cfg, false); !changed || err != nil {
		t.Fatalf("disable: changed=%v err=%v", changed, err)
	}
	dump = nft.Dump()
	if strings.Contains(dump, nftTable) {
		t.Errorf("table left after disabling masquerade:\n%s", dump)
	}
	if changed, err := m.sync(ctx, &cfg, true); changed || err != nil {
		t.Errorf("second disable: changed=%v err=%v", changed, err)
	}
}
