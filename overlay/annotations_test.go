package overlay

import (
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestParsePeer(t *testing.T) {
	node := func(cidrs []string, ann map[string]string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "p", Annotations: ann}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	}
	tests := []struct {
		name string
		node *corev1.Node
		want string // summary of the parsed peer, or the skip reason
	}{
		{"dual-stack, both underlays", node([]string{"10.42.2.0/24", "fd42:0:0:2::/64"}, map[string]string{
			AnnotationPublicIP: "198.18.0.2", AnnotationVTEPMAC: "02:00:00:00:02:04",
			AnnotationPublicIPv6: "fd00::2", AnnotationVTEPMACv6: "02:00:00:00:02:06",
		}), "[10.42.2.0/24 fd42:0:0:2::/64] [198.18.0.2 fd00::2] [02:00:00:00:02:04 02:00:00:00:02:06]"},
		{"legacy spec.podCIDR only", &corev1.Node{Spec: corev1.NodeSpec{PodCIDR: "10.42.2.0/24"}},
			"[10.42.2.0/24 invalid Prefix] [invalid IP invalid IP] [ ]"},
		{"no annotations is not an error here", node([]string{"10.42.2.0/24"}, nil),
			"[10.42.2.0/24 invalid Prefix] [invalid IP invalid IP] [ ]"},
		{"no podCIDR", node(nil, nil), reasonNoPodCIDR},
		{"garbage podCIDR", node([]string{"10.42.2.0/33"}, nil), reasonMalformedPodCIDR},
		{"podCIDR with host bits", node([]string{"10.42.2.1/24"}, nil), reasonMalformedPodCIDR},
		{"IPv4-mapped podCIDR", node([]string{"::ffff:10.42.2.0/120"}, nil), reasonMalformedPodCIDR},
		{"two IPv4 podCIDRs", node([]string{"10.42.2.0/24", "10.42.3.0/24"}, nil), reasonWrongFamily},
		{"IPv6 in public-ip", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIP: "fd00::2"}), reasonWrongFamily},
		{"IPv4 in public-ip-v6", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIPv6: "198.18.0.2"}), reasonWrongFamily},
		{"mapped IPv4 in public-ip", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIP: "::ffff:198.18.0.2"}), reasonMalformed},
		{"unspecified public-ip", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIP: "0.0.0.0"}), reasonMalformed},
		{"multicast public-ip", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIP: "239.1.1.1"}), reasonMalformed},
		{"zoned public-ip-v6", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIPv6: "fe80::1%eth0"}), reasonMalformed},
		{"empty public-ip", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationPublicIP: ""}), reasonMalformed},
		{"garbage MAC", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationVTEPMAC: "nope"}), reasonMalformed},
		{"EUI-64 MAC", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationVTEPMAC: "02:00:00:00:00:00:00:01"}), reasonMalformed},
		{"zero MAC", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationVTEPMAC: "00:00:00:00:00:00"}), reasonMalformed},
		{"broadcast MAC", node([]string{"10.42.2.0/24"}, map[string]string{AnnotationVTEPMACv6: "ff:ff:ff:ff:ff:ff"}), reasonMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := parsePeer(tt.node)
			got := ""
			if err != nil {
				got = err.Reason
			} else {
				got = fmt.Sprintf("%v %v [%s %s]", p.PodCIDRs, p.PublicIP, p.MAC[v4], p.MAC[v6])
			}
			if got != tt.want {
				t.Errorf("parsePeer = %q (%v), want %q", got, err, tt.want)
			}
		})
	}
}

func TestAnnotationPatch(t *testing.T) {
	want := map[string]string{
		AnnotationPublicIP: "198.18.0.1", AnnotationVTEPMAC: "02:00:00:00:01:04",
		AnnotationPublicIPv6: "", AnnotationVTEPMACv6: "",
	}
	tests := []struct {
		name    string
		current map[string]string
		patch   string
	}{
		{"nothing yet", nil,
			`{"metadata":{"annotations":{"overlay.knit.dev/public-ip":"198.18.0.1","overlay.knit.dev/vtep-mac":"02:00:00:00:01:04"}}}`},
		{"up to date, others' annotations untouched", map[string]string{
			AnnotationPublicIP: "198.18.0.1", AnnotationVTEPMAC: "02:00:00:00:01:04", "other": "x"}, ""},
		{"node IP changed, stale IPv6 keys removed", map[string]string{
			AnnotationPublicIP: "198.18.0.9", AnnotationVTEPMAC: "02:00:00:00:01:04",
			AnnotationPublicIPv6: "fd00::1", AnnotationVTEPMACv6: "02:00:00:00:01:06"},
			`{"metadata":{"annotations":{"overlay.knit.dev/public-ip":"198.18.0.1","overlay.knit.dev/public-ip-v6":null,"overlay.knit.dev/vtep-mac-v6":null}}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := annotationPatch(tt.current, want)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != tt.patch {
				t.Errorf("patch = %s\nwant    %s", b, tt.patch)
			}
		})
	}
}

func TestOwnAnnotations(t *testing.T) {
	loc := localNode{Name: "n1", Underlay: [2]underlay{ul4, ul6}}
	devs := []device{{Name: deviceV4, Underlay: v4, MAC: vtepMAC("n1", deviceV4)}}
	got := ownAnnotations(loc, devs)
	want := map[string]string{
		AnnotationPublicIP: "198.18.0.1", AnnotationPublicIPv6: "fd00::1",
		AnnotationVTEPMAC: vtepMAC("n1", deviceV4).String(), AnnotationVTEPMACv6: "",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("ownAnnotations = %v, want %v", got, want)
	}
	// What a node publishes ("" values are deleted), its peers parse back.
	published := map[string]string{}
	for k, v := range got {
		if v != "" {
			published[k] = v
		}
	}
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Annotations: published}, Spec: corev1.NodeSpec{PodCIDRs: []string{"10.42.1.0/24"}}}
	p, err := parsePeer(n)
	if err != nil || p.PublicIP[v4] != ul4.Addr || p.MAC[v4].String() != want[AnnotationVTEPMAC] {
		t.Errorf("own annotations do not parse back: %+v, %v", p, err)
	}
}

func TestVTEPMAC(t *testing.T) {
	a, b := vtepMAC("n1", deviceV4), vtepMAC("n1", deviceV6)
	if a.String() == b.String() || vtepMAC("n2", deviceV4).String() == a.String() {
		t.Error("VTEP MACs collide")
	}
	if vtepMAC("n1", deviceV4).String() != a.String() {
		t.Error("VTEP MAC not stable")
	}
	if a[0]&0x01 != 0 || a[0]&0x02 == 0 {
		t.Errorf("%s is not a locally administered unicast MAC", a)
	}
}

// FuzzParsePeer feeds arbitrary podCIDRs and annotations through parsePeer
// and render: no panic, and whatever is accepted yields only sane entries.
func FuzzParsePeer(f *testing.F) {
	f.Add("10.42.2.0/24", "fd42:0:0:2::/64", "198.18.0.2", "fd00::2", "02:00:00:00:02:04", "02:00:00:00:02:06")
	f.Add("10.42.2.0/24", "", "198.18.0.2", "", "02:00:00:00:02:04", "")
	f.Add("0.0.0.0/0", "::/0", "fd00::2", "198.18.0.2", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00")
	f.Add("10.42.1.0/25", "10.42.2.0/24", "127.0.0.1", "::1", "01:00:5e:00:00:01", "zz")
	f.Fuzz(func(t *testing.T, cidr4, cidr6, ip4, ip6, mac4, mac6 string) {
		n := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "fuzz", Annotations: map[string]string{}},
			Spec:       corev1.NodeSpec{PodCIDRs: []string{cidr4, cidr6}},
		}
		for k, v := range map[string]string{AnnotationPublicIP: ip4, AnnotationPublicIPv6: ip6,
			AnnotationVTEPMAC: mac4, AnnotationVTEPMACv6: mac6} {
			if v != "" {
				n.Annotations[k] = v
			}
		}
		p, err := parsePeer(n)
		if err == nil {
			for _, fam := range families {
				if pc := p.PodCIDRs[fam]; pc.IsValid() && (pc != pc.Masked() || familyOf(pc.Addr()) != fam) {
					t.Fatalf("accepted podCIDR %s as %s", pc, fam)
				}
				if a := p.PublicIP[fam]; a.IsValid() && (familyOf(a) != fam || !a.IsGlobalUnicast()) {
					t.Fatalf("accepted public IP %s as %s", a, fam)
				}
				if m := p.MAC[fam]; m != nil && (len(m) != 6 || m[0]&1 != 0) {
					t.Fatalf("accepted MAC %s", m)
				}
			}
		}
		for _, backend := range []Backend{BackendVXLAN, BackendAuto, BackendDirect} {
			cfg := testConfig(t, backend)
			rd := render(&cfg, localNode{Name: "n1", PodCIDRs: dual, Underlay: [2]underlay{ul4, ul6}}, []*corev1.Node{n})
			for _, r := range rd.Routes {
				if !inClusterCIDRs(cfg.ClusterCIDRs, r.Dst) || r.Dst.Overlaps(dual[v4]) || r.Dst.Overlaps(dual[v6]) {
					t.Fatalf("route to %s: outside the cluster or over this node's podCIDR", r.Dst)
				}
				if familyOf(r.Gw) != familyOf(r.Dst.Addr()) {
					t.Fatalf("route to %s via %s: gateway of the wrong family", r.Dst, r.Gw)
				}
			}
		}
	})
}
