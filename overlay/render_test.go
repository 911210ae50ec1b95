package overlay

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// summarize prints a render result one fact per line, in a stable order.
func summarize(rd rendered) string {
	var out []string
	for _, d := range rd.Devices {
		out = append(out, fmt.Sprintf("device %s local %s link %d mtu %d addrs %v", d.Name, d.Local, d.UnderlayIndex, d.MTU, d.Addrs))
	}
	for _, r := range rd.Routes {
		if r.Dev != "" {
			out = append(out, fmt.Sprintf("route %s via %s dev %s", r.Dst, r.Gw, r.Dev))
		} else {
			out = append(out, fmt.Sprintf("route %s via %s link %d", r.Dst, r.Gw, r.LinkIndex))
		}
	}
	for _, n := range rd.Neighs {
		out = append(out, fmt.Sprintf("neigh %s %s %s", n.Dev, n.IP, n.MAC))
	}
	for _, f := range rd.FDB {
		out = append(out, fmt.Sprintf("fdb %s %s %s", f.Dev, f.MAC, f.Dst))
	}
	for _, s := range rd.Skips {
		fam := "all"
		if !s.Whole {
			fam = s.Family.String()
		}
		out = append(out, fmt.Sprintf("skip %s %s %s", s.Peer, fam, s.Err.Reason))
	}
	var prog []string
	for p, how := range rd.Programmed {
		prog = append(prog, p+"="+how)
	}
	slices.Sort(prog)
	out = append(out, fmt.Sprintf("programmed %v peers %d podMTU %d", prog, rd.Peers, rd.PodMTU))
	return strings.Join(out, "\n")
}

var (
	v4Only = [2]netip.Prefix{netip.MustParsePrefix("10.42.1.0/24")}
	dual   = [2]netip.Prefix{netip.MustParsePrefix("10.42.1.0/24"), netip.MustParsePrefix("fd42:0:0:1::/64")}

	ul4 = underlay{Addr: netip.MustParseAddr("198.18.0.1"), Prefix: netip.MustParsePrefix("198.18.0.0/24"), LinkIndex: 2, MTU: 1500}
	ul6 = underlay{Addr: netip.MustParseAddr("fd00::1"), Prefix: netip.MustParsePrefix("fd00::/64"), LinkIndex: 2, MTU: 1500}
)

func TestRender(t *testing.T) {
	mac2, mac3 := testMAC(2, v4), testMAC(3, v4)
	mac2v6 := testMAC(2, v6)
	tests := []struct {
		name     string
		backend  Backend
		podCIDRs [2]netip.Prefix
		underlay [2]underlay
		nodes    []*corev1.Node
		want     string
	}{{
		name:     "vxlan, two peers, own node ignored",
		backend:  BackendVXLAN,
		podCIDRs: v4Only,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("n3", 3, []string{"10.42.3.0/24"}, []string{"198.19.0.3"}),
			knitNode("n1", 1, []string{"10.42.1.0/24"}, []string{"198.18.0.1"}),
			knitNode("n2", 2, []string{"10.42.2.0/24"}, []string{"198.18.0.2"}),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32]",
			"route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4",
			"route 10.42.3.0/24 via 10.42.3.0 dev knit-vx4",
			"neigh knit-vx4 10.42.2.0 "+mac2,
			"neigh knit-vx4 10.42.3.0 "+mac3,
			"fdb knit-vx4 "+mac2+" 198.18.0.2",
			"fdb knit-vx4 "+mac3+" 198.19.0.3",
			"programmed [n2=vxlan n3=vxlan] peers 2 podMTU 1450"),
	}, {
		name:     "dual-stack pods over an IPv4 underlay: one device, one FDB entry per peer",
		backend:  BackendVXLAN,
		podCIDRs: dual,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"10.42.2.0/24", "fd42:0:0:2::/64"}, []string{"198.18.0.2"}),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32 fd42:0:0:1::/128]",
			"route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4",
			"route fd42:0:0:2::/64 via fd42:0:0:2:: dev knit-vx4",
			"neigh knit-vx4 10.42.2.0 "+mac2,
			"neigh knit-vx4 fd42:0:0:2:: "+mac2,
			"fdb knit-vx4 "+mac2+" 198.18.0.2",
			"programmed [n2=vxlan] peers 1 podMTU 1450"),
	}, {
		name:     "IPv6 only underlay: 70 bytes overhead",
		backend:  BackendVXLAN,
		podCIDRs: [2]netip.Prefix{{}, dual[v6]},
		underlay: [2]underlay{{}, ul6},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"fd42:0:0:2::/64"}, []string{"fd00::2"}),
		},
		want: lines(
			"device knit-vx6 local fd00::1 link 2 mtu 1430 addrs [fd42:0:0:1::/128]",
			"route fd42:0:0:2::/64 via fd42:0:0:2:: dev knit-vx6",
			"neigh knit-vx6 fd42:0:0:2:: "+mac2v6,
			"fdb knit-vx6 "+mac2v6+" fd00::2",
			"programmed [n2=vxlan] peers 1 podMTU 1430"),
	}, {
		name:     "dual-stack underlay: each pod family over its own underlay; a v4-only peer gets IPv6 over IPv4",
		backend:  BackendVXLAN,
		podCIDRs: dual,
		underlay: [2]underlay{ul4, ul6},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"10.42.2.0/24", "fd42:0:0:2::/64"}, []string{"198.18.0.2", "fd00::2"}),
			knitNode("n3", 3, []string{"10.42.3.0/24", "fd42:0:0:3::/64"}, []string{"198.18.0.3"}),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32 fd42:0:0:1::/128]",
			"device knit-vx6 local fd00::1 link 2 mtu 1430 addrs [10.42.1.0/32 fd42:0:0:1::/128]",
			"route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4",
			"route 10.42.3.0/24 via 10.42.3.0 dev knit-vx4",
			"route fd42:0:0:2::/64 via fd42:0:0:2:: dev knit-vx6",
			"route fd42:0:0:3::/64 via fd42:0:0:3:: dev knit-vx4",
			"neigh knit-vx4 10.42.2.0 "+mac2,
			"neigh knit-vx4 10.42.3.0 "+mac3,
			"neigh knit-vx6 fd42:0:0:2:: "+mac2v6,
			"neigh knit-vx4 fd42:0:0:3:: "+mac3,
			"fdb knit-vx4 "+mac2+" 198.18.0.2",
			"fdb knit-vx4 "+mac3+" 198.18.0.3",
			"fdb knit-vx6 "+mac2v6+" fd00::2",
			"programmed [n2=vxlan n3=vxlan] peers 2 podMTU 1430"),
	}, {
		name:     "auto: direct on the same subnet, VXLAN across",
		backend:  BackendAuto,
		podCIDRs: v4Only,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"10.42.2.0/24"}, []string{"198.18.0.2"}),
			knitNode("n3", 3, []string{"10.42.3.0/24"}, []string{"198.19.0.3"}),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32]",
			"route 10.42.2.0/24 via 198.18.0.2 link 2",
			"route 10.42.3.0/24 via 10.42.3.0 dev knit-vx4",
			"neigh knit-vx4 10.42.3.0 "+mac3,
			"fdb knit-vx4 "+mac3+" 198.19.0.3",
			"programmed [n2=direct n3=vxlan] peers 2 podMTU 1450"),
	}, {
		name:     "auto, dual-stack pods over IPv4 only: IPv4 direct, IPv6 through VXLAN",
		backend:  BackendAuto,
		podCIDRs: dual,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"10.42.2.0/24", "fd42:0:0:2::/64"}, []string{"198.18.0.2"}),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32 fd42:0:0:1::/128]",
			"route 10.42.2.0/24 via 198.18.0.2 link 2",
			"route fd42:0:0:2::/64 via fd42:0:0:2:: dev knit-vx4",
			"neigh knit-vx4 fd42:0:0:2:: "+mac2,
			"fdb knit-vx4 "+mac2+" 198.18.0.2",
			"programmed [n2=mixed] peers 1 podMTU 1450"),
	}, {
		name:     "direct: no device, full underlay MTU, off-subnet and v6-over-v4 peers skipped",
		backend:  BackendDirect,
		podCIDRs: dual,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"10.42.2.0/24", "fd42:0:0:2::/64"}, []string{"198.18.0.2"}),
			knitNode("n3", 3, []string{"10.42.3.0/24"}, []string{"198.19.0.3"}),
			knitNode("n4", 4, []string{"10.42.4.0/24"}, nil),
		},
		want: lines(
			"route 10.42.2.0/24 via 198.18.0.2 link 2",
			"skip n3 IPv6 no-podcidr",
			"skip n4 IPv6 no-podcidr",
			"skip n3 IPv4 not-same-subnet",
			"skip n4 IPv4 missing-annotation",
			"skip n2 IPv6 wrong-family",
			"programmed [n2=direct] peers 3 podMTU 1500"),
	}, {
		name:     "bad input is skipped, never routed",
		backend:  BackendVXLAN,
		podCIDRs: v4Only,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("good", 9, []string{"10.42.9.0/24"}, []string{"198.18.0.9"}),
			knitNode("no-cidr", 2, nil, []string{"198.18.0.2"}),
			knitNode("bad-mac", 3, []string{"10.42.3.0/24"}, []string{"198.18.0.3"}, withAnnotation(AnnotationVTEPMAC, "zz:zz")),
			knitNode("mcast-mac", 4, []string{"10.42.4.0/24"}, []string{"198.18.0.4"}, withAnnotation(AnnotationVTEPMAC, "01:00:5e:00:00:01")),
			knitNode("bad-ip", 5, []string{"10.42.5.0/24"}, []string{"198.18.0.5"}, withAnnotation(AnnotationPublicIP, "198.18.0.500")),
			knitNode("v6-in-v4-key", 6, []string{"10.42.6.0/24"}, []string{"198.18.0.6"}, withAnnotation(AnnotationPublicIP, "fd00::6")),
			knitNode("ours", 7, []string{"10.42.1.0/25"}, []string{"198.18.0.7"}),
			knitNode("outside", 8, []string{"10.99.8.0/24"}, []string{"198.18.0.8"}),
			knitNode("host-bits", 10, []string{"10.42.10.1/24"}, []string{"198.18.0.10"}),
			knitNode("no-annotations", 11, []string{"10.42.11.0/24"}, []string{"198.18.0.11"}, withoutAnnotations()),
			knitNode("no-mac", 12, []string{"10.42.12.0/24"}, []string{"198.18.0.12"}, withAnnotation(AnnotationVTEPMAC, "")),
			knitNode("same-mac", 9, []string{"10.42.13.0/24"}, []string{"198.18.0.13"}),
			knitNode("overlap-a", 14, []string{"10.42.14.0/23"}, []string{"198.18.0.14"}),
			knitNode("overlap-b", 15, []string{"10.42.15.0/24"}, []string{"198.18.0.15"}),
			knitNode("default-route", 16, []string{"0.0.0.0/0"}, []string{"198.18.0.16"}),
			knitNode("loopback-ip", 17, []string{"10.42.17.0/24"}, []string{"198.18.0.17"}, withAnnotation(AnnotationPublicIP, "127.0.0.1")),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32]",
			"route 10.42.9.0/24 via 10.42.9.0 dev knit-vx4",
			"neigh knit-vx4 10.42.9.0 "+testMAC(9, v4),
			"fdb knit-vx4 "+testMAC(9, v4)+" 198.18.0.9",
			"skip bad-ip all malformed-annotation",
			"skip bad-mac all malformed-annotation",
			"skip host-bits all malformed-podcidr",
			"skip loopback-ip all malformed-annotation",
			"skip mcast-mac all malformed-annotation",
			"skip no-cidr all no-podcidr",
			"skip v6-in-v4-key all wrong-family",
			"skip default-route IPv4 outside-cluster-cidr",
			"skip ours IPv4 overlapping-podcidr",
			"skip outside IPv4 outside-cluster-cidr",
			"skip overlap-a IPv4 overlapping-podcidr",
			"skip overlap-b IPv4 overlapping-podcidr",
			"skip no-annotations IPv4 missing-annotation",
			"skip no-mac IPv4 missing-annotation",
			"skip same-mac IPv4 duplicate-vtep-mac",
			"programmed [good=vxlan] peers 16 podMTU 1450"),
	}, {
		// A podCIDR over this node's own is wrong for sure: only it goes,
		// the peers it also overlaps keep their routes.
		name:     "a podCIDR containing this node's takes no other peer down",
		backend:  BackendVXLAN,
		podCIDRs: v4Only,
		underlay: [2]underlay{ul4},
		nodes: []*corev1.Node{
			knitNode("n2", 2, []string{"10.42.2.0/24"}, []string{"198.18.0.2"}),
			knitNode("big", 5, []string{"10.42.0.0/20"}, []string{"198.18.0.5"}),
		},
		want: lines(
			"device knit-vx4 local 198.18.0.1 link 2 mtu 1450 addrs [10.42.1.0/32]",
			"route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4",
			"neigh knit-vx4 10.42.2.0 "+mac2,
			"fdb knit-vx4 "+mac2+" 198.18.0.2",
			"skip big IPv4 overlapping-podcidr",
			"programmed [n2=vxlan] peers 2 podMTU 1450"),
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, tt.backend)
			loc := localNode{Name: "n1", PodCIDRs: tt.podCIDRs, Underlay: tt.underlay}
			got := summarize(render(&cfg, loc, tt.nodes))
			// Device MACs are derived from the node name; not what this test is about.
			if got != tt.want {
				t.Errorf("render:\n%s\nwant:\n%s", got, tt.want)
			}
			// Same input in another order: same output.
			rev := slices.Clone(tt.nodes)
			slices.Reverse(rev)
			if again := summarize(render(&cfg, loc, rev)); again != got {
				t.Errorf("render depends on node order:\n%s\nvs\n%s", again, got)
			}
		})
	}
}

func TestMarkOverlaps(t *testing.T) {
	tests := []struct {
		in   []string
		want []string // the overlapping ones, sorted
	}{
		{[]string{"10.42.1.0/24", "10.42.2.0/24", "10.42.3.0/24"}, nil},
		{[]string{"10.42.1.0/24", "10.42.1.0/24"}, []string{"10.42.1.0/24", "10.42.1.0/24"}},
		{[]string{"10.42.0.0/16", "10.42.7.0/24", "10.43.0.0/24"}, []string{"10.42.0.0/16", "10.42.7.0/24"}},
		{[]string{"10.42.2.0/24", "10.42.0.0/22", "10.42.9.0/24", "10.42.4.0/24"}, []string{"10.42.0.0/22", "10.42.2.0/24"}},
		{[]string{"fd42:0:0:1::/64", "fd42::/56", "fd43::/64"}, []string{"fd42::/56", "fd42:0:0:1::/64"}},
		// Two runs, the first of three.
		{[]string{"10.42.0.0/22", "10.42.1.0/24", "10.42.2.0/24", "10.42.8.0/24", "10.42.8.0/25", "10.42.9.0/24"},
			[]string{"10.42.0.0/22", "10.42.1.0/24", "10.42.2.0/24", "10.42.8.0/24", "10.42.8.0/25"}},
	}
	for _, tt := range tests {
		var c []candidate
		for i, s := range tt.in {
			c = append(c, candidate{peer: i, prefix: netip.MustParsePrefix(s)})
		}
		markOverlaps(c)
		var got []string
		for _, x := range c {
			if x.overlap {
				got = append(got, x.prefix.String())
				// It names one it really overlaps.
				if other := netip.MustParsePrefix(tt.in[x.with]); x.with == x.peer || !other.Overlaps(x.prefix) {
					t.Errorf("markOverlaps(%v): %s said to overlap %s (#%d)", tt.in, x.prefix, other, x.with)
				}
			}
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("markOverlaps(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

// The skip detail of overlapping podCIDRs names the peer and podCIDR
// conflicted with, or this node's own.
func TestOverlapDetail(t *testing.T) {
	cfg := testConfig(t, BackendVXLAN)
	rd := render(&cfg, localNode{Name: "n1", PodCIDRs: v4Only, Underlay: [2]underlay{ul4}}, []*corev1.Node{
		knitNode("a", 2, []string{"10.42.14.0/23"}, []string{"198.18.0.2"}),
		knitNode("b", 3, []string{"10.42.15.0/24"}, []string{"198.18.0.3"}),
		knitNode("c", 4, []string{"10.42.1.128/25"}, []string{"198.18.0.4"}),
	})
	var got []string
	for _, s := range rd.Skips {
		got = append(got, s.Peer+": "+s.Err.Error())
	}
	want := []string{
		"c: overlapping-podcidr: podCIDR 10.42.1.128/25 overlaps this node's 10.42.1.0/24",
		"a: overlapping-podcidr: podCIDR 10.42.14.0/23 overlaps b's 10.42.15.0/24",
		"b: overlapping-podcidr: podCIDR 10.42.15.0/24 overlaps a's 10.42.14.0/23",
	}
	if !slices.Equal(got, want) {
		t.Errorf("skips:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestLastAddr(t *testing.T) {
	for in, want := range map[string]string{
		"10.42.1.0/24":    "10.42.1.255",
		"10.42.1.7/32":    "10.42.1.7",
		"fd42:0:0:1::/64": "fd42::1:ffff:ffff:ffff:ffff",
		"0.0.0.0/0":       "255.255.255.255",
	} {
		if got := lastAddr(netip.MustParsePrefix(in)).String(); got != want {
			t.Errorf("lastAddr(%s) = %s, want %s", in, got, want)
		}
	}
}
