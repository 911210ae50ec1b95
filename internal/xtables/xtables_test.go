package xtables

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// fakeSystem has the programs of the given variants ("legacy", "nft", ""
// for plain) and answers iptables-save with save[program].
func fakeSystem(installed []string, save map[string]string, version string) System {
	have := map[string]bool{}
	for _, v := range installed {
		for _, v6 := range []bool{false, true} {
			t := ToolsOf(v, v6)
			have[t.IPTables], have[t.Save], have[t.Restore] = true, true, true
		}
	}
	return System{
		LookPath: func(p string) (string, error) {
			if have[p] {
				return "/usr/sbin/" + p, nil
			}
			return "", errors.New("not found")
		},
		Save:    func(_ context.Context, p string) ([]byte, error) { return []byte(save[p]), nil },
		Version: func(context.Context, string) ([]byte, error) { return []byte(version), nil },
	}
}

// TestDetect covers the variant choice (kube-proxy's iptables-wrapper and
// k3s rules) and the mismatch report.
func TestDetect(t *testing.T) {
	tests := []struct {
		name         string
		installed    []string // variants: "legacy", "nft", "" (plain)
		save         map[string]string
		version      string
		want         string
		wantVariant  string
		wantPlain    bool
		wantMismatch bool
		wantErr      string
	}{
		{name: "both empty: nft", installed: []string{"legacy", "nft"}, wantVariant: NFT},
		{name: "legacy in use", installed: []string{"legacy", "nft"},
			save: map[string]string{"iptables-legacy-save": "*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"}, wantVariant: Legacy},
		{name: "both in use: more rules wins, mismatch reported", installed: []string{"legacy", "nft"},
			save: map[string]string{
				"iptables-legacy-save": "*nat\n-A POSTROUTING -j MASQUERADE\n-A POSTROUTING -j RETURN\n",
				"iptables-nft-save":    "*filter\n-A FORWARD -j DROP\n",
			}, wantVariant: Legacy, wantMismatch: true},
		{name: "kubelet's hint beats counts", installed: []string{"legacy", "nft"},
			save: map[string]string{
				"iptables-legacy-save": "*nat\n-A POSTROUTING -j MASQUERADE\n-A POSTROUTING -j RETURN\n",
				"ip6tables-nft-save":   "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\n-A FORWARD -j DROP\n",
			}, wantVariant: NFT, wantMismatch: true},
		{name: "the overlay's own rules do not count", installed: []string{"legacy", "nft"},
			save: map[string]string{
				"iptables-legacy-save": "*nat\n-A POSTROUTING -j MASQUERADE\n",
				"iptables-nft-save": "*filter\n:FORWARD DROP [0:0]\n:KNIT-FORWARD - [0:0]\n" +
					"-A FORWARD -m comment --comment \"knit overlay forward rules\" -j KNIT-FORWARD\n" +
					"-A KNIT-FORWARD -s 10.42.0.0/16 -j ACCEPT\n-A KNIT-FORWARD -d 10.42.0.0/16 -j ACCEPT\n",
			}, wantVariant: Legacy},
		{name: "only legacy installed", installed: []string{"legacy"}, wantVariant: Legacy},
		{name: "plain iptables, nf_tables", installed: []string{""}, version: "iptables v1.8.9 (nf_tables)\n", wantVariant: NFT, wantPlain: true},
		{name: "plain iptables, legacy", installed: []string{""}, version: "iptables v1.6.1\n", wantVariant: Legacy, wantPlain: true},
		{name: "none", wantErr: "no iptables found"},
		{name: "forced legacy", installed: []string{"legacy", "nft"}, want: Legacy, wantVariant: Legacy},
		{name: "forced but missing", installed: []string{"legacy"}, want: NFT, wantErr: "iptables-nft requested"},
		{name: "unknown", installed: []string{"legacy"}, want: "ebt", wantErr: "unknown iptables variant"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := fakeSystem(tc.installed, tc.save, tc.version).Detect(context.Background(), tc.want)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d.Variant != tc.wantVariant || d.Mismatch != tc.wantMismatch || d.Plain != tc.wantPlain {
				t.Errorf("variant %s plain %v mismatch %v (%s), want %s %v %v", d.Variant, d.Plain, d.Mismatch, d.Why,
					tc.wantVariant, tc.wantPlain, tc.wantMismatch)
			}
			if d.Mismatch && !strings.Contains(d.MismatchText(), "iptables-"+d.Variant) {
				t.Errorf("mismatch text does not say what knit uses: %s", d.MismatchText())
			}
			wantTool := "ip6tables-" + d.Variant + "-restore"
			if d.Plain {
				wantTool = "ip6tables-restore"
			}
			if got := d.Tools(true).Restore; got != wantTool {
				t.Errorf("Tools(v6).Restore = %s, want %s", got, wantTool)
			}
		})
	}
}

// TestInUse: the overlay programs the chosen variant, and the other one
// too when it holds rules or a DROP policy of its own.
func TestInUse(t *testing.T) {
	tests := []struct {
		name      string
		installed []string
		save      map[string]string
		want      []string
		wantErr   bool
	}{
		{name: "both installed, empty", installed: []string{"legacy", "nft"}, want: []string{NFT}},
		{name: "legacy has a DROP policy only", installed: []string{"legacy", "nft"},
			save: map[string]string{"iptables-legacy-save": "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\nCOMMIT\n"},
			want: []string{NFT, Legacy}},
		{name: "a DROP policy in ip6tables-legacy counts too", installed: []string{"legacy", "nft"},
			save: map[string]string{"ip6tables-legacy-save": "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n"},
			want: []string{NFT, Legacy}},
		{name: "a DROP policy in another table is no FORWARD policy", installed: []string{"legacy", "nft"},
			save: map[string]string{"iptables-legacy-save": "*mangle\n:FORWARD DROP [0:0]\nCOMMIT\n"},
			want: []string{NFT}},
		{name: "both hold rules", installed: []string{"legacy", "nft"},
			save: map[string]string{
				"iptables-legacy-save": "*nat\n-A POSTROUTING -j MASQUERADE\n-A POSTROUTING -j RETURN\n",
				"iptables-nft-save":    "*filter\n-A FORWARD -j DROP\n",
			}, want: []string{Legacy, NFT}},
		{name: "the overlay's chain of an earlier run is kept up to date", installed: []string{"legacy", "nft"},
			save: map[string]string{"iptables-legacy-save": "*filter\n:FORWARD ACCEPT [0:0]\n:KNIT-FORWARD - [0:0]\n-A KNIT-FORWARD -s 10.42.0.0/16 -j ACCEPT\nCOMMIT\n"},
			want: []string{NFT, Legacy}},
		{name: "only nft", installed: []string{"nft"}, want: []string{NFT}},
		{name: "plain", installed: []string{""}, want: []string{Legacy}},
		{name: "none", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sys := fakeSystem(tc.installed, tc.save, "iptables v1.8.9 (legacy)")
			saves := map[string]int{}
			save := sys.Save
			sys.Save = func(ctx context.Context, p string) ([]byte, error) { saves[p]++; return save(ctx, p) }
			got, err := sys.InUse(context.Background())
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v", err)
			}
			for p, n := range saves {
				if n > 1 {
					t.Errorf("%s ran %d times, want at most once", p, n)
				}
			}
			var variants []string
			for _, d := range got {
				variants = append(variants, d.Variant)
			}
			if !slices.Equal(variants, tc.want) {
				t.Errorf("in use %v, want %v", variants, tc.want)
			}
		})
	}
}
