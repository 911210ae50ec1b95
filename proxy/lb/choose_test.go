package lb

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// node is a Ready node with the given InternalIPs.
func node(name string, ips ...string) *corev1.Node {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"},
		Status:     corev1.NodeStatus{Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}},
	}
	for _, ip := range ips {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
	return n
}

func notReady(n *corev1.Node) *corev1.Node {
	n.Status.Conditions[0].Status = corev1.ConditionFalse
	return n
}

// lbService is a LoadBalancer Service of the given class ("" for none).
func lbService(name, class string, local bool, fams ...corev1.IPFamily) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: types.UID("uid-" + name), ResourceVersion: "1", Generation: 1},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeLoadBalancer,
			ClusterIP:  "10.43.0.20",
			Ports:      []corev1.ServicePort{{Name: "http", Port: 8088, Protocol: corev1.ProtocolTCP}},
			IPFamilies: fams,
		},
	}
	if class != "" {
		s.Spec.LoadBalancerClass = &class
	}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	return s
}

// onPort moves the Service to another port.
func onPort(s *corev1.Service, port int32) *corev1.Service {
	s.Spec.Ports[0].Port = port
	return s
}

// slice is an EndpointSlice of svc with one endpoint per "node=ready" pair.
func slice(svc, name string, eps ...string) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, ResourceVersion: "1",
			Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for i, e := range eps {
		n, ready, _ := strings.Cut(e, "=")
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.42.0.%d", i+1)},
			NodeName:   &n,
			Conditions: discoveryv1.EndpointConditions{Ready: new(ready != "false")},
		})
	}
	return s
}

func ips(p plan) string {
	var out []string
	for _, i := range p.ingress {
		out = append(out, i.IP)
	}
	return strings.Join(out, " ")
}

func TestChoose(t *testing.T) {
	threeNodes := []*corev1.Node{node("n1", "198.18.0.1"), node("n2", "198.18.0.2"), node("n3", "198.18.0.3")}
	for _, tt := range []struct {
		name    string
		svc     *corev1.Service
		nodes   []*corev1.Node
		slices  []*discoveryv1.EndpointSlice
		max     int
		current []string // status IPs before
		held    []string // addresses whose port an older Service holds
		want    string
		reason  string
	}{
		{name: "cluster: every ready node", svc: lbService("s", "knit.dev/lb", false), nodes: threeNodes,
			want: "198.18.0.1 198.18.0.2 198.18.0.3", reason: ReasonNodesChosen},
		{name: "cluster: not-ready, excluded, deleting and address-less nodes left out", svc: lbService("s", "knit.dev/lb", false),
			nodes: []*corev1.Node{
				node("n1", "198.18.0.1"),
				notReady(node("n2", "198.18.0.2")),
				func() *corev1.Node {
					n := node("n3", "198.18.0.3")
					n.Labels = map[string]string{corev1.LabelNodeExcludeBalancers: ""}
					return n
				}(),
				func() *corev1.Node {
					n := node("n4", "198.18.0.4")
					n.DeletionTimestamp = &metav1.Time{}
					return n
				}(),
				node("n5"),
			},
			want: "198.18.0.1", reason: ReasonNodesChosen},
		{name: "no nodes at all", svc: lbService("s", "knit.dev/lb", false), want: "", reason: ReasonNoNodes},
		{name: "families: IPv4 Service on dual-stack nodes", svc: lbService("s", "", false, corev1.IPv4Protocol),
			nodes: []*corev1.Node{node("n1", "198.18.0.1", "fd18::1"), node("n2", "fd18::2")},
			want:  "198.18.0.1", reason: ReasonNodesChosen},
		{name: "families: dual-stack Service", svc: lbService("s", "", false, corev1.IPv4Protocol, corev1.IPv6Protocol),
			nodes: []*corev1.Node{node("n1", "198.18.0.1", "fd18::1"), node("n2", "fd18::2")},
			want:  "198.18.0.1 fd18::1 fd18::2", reason: ReasonNodesChosen},
		{name: "local: only nodes with a ready endpoint", svc: lbService("s", "knit.dev/lb", true), nodes: threeNodes,
			slices: []*discoveryv1.EndpointSlice{slice("s", "s-1", "n2", "n3=false"), slice("s", "s-2", "n2", "n9")},
			want:   "198.18.0.2", reason: ReasonNodesChosen},
		{name: "local: no endpoints", svc: lbService("s", "knit.dev/lb", true), nodes: threeNodes,
			want: "", reason: ReasonNoNodes},
		{name: "cap keeps listed nodes", svc: lbService("s", "knit.dev/lb", false), nodes: threeNodes, max: 1,
			current: []string{"198.18.0.3"}, want: "198.18.0.3", reason: ReasonNodesChosen},
		{name: "cap drops a listed node that cannot serve", svc: lbService("s", "knit.dev/lb", true), nodes: threeNodes, max: 2,
			slices:  []*discoveryv1.EndpointSlice{slice("s", "s-1", "n1", "n2")},
			current: []string{"198.18.0.3"}, want: "198.18.0.1 198.18.0.2", reason: ReasonNodesChosen},
		{name: "port taken on one node", svc: lbService("s", "knit.dev/lb", false), nodes: threeNodes,
			held: []string{"198.18.0.2"}, want: "198.18.0.1 198.18.0.3", reason: ReasonNodesChosen},
		{name: "port taken on the v6 address only", svc: lbService("s", "", false, corev1.IPv4Protocol, corev1.IPv6Protocol),
			nodes: []*corev1.Node{node("n1", "198.18.0.1", "fd18::1")},
			held:  []string{"fd18::1"}, want: "198.18.0.1", reason: ReasonNodesChosen},
		{name: "port taken everywhere", svc: lbService("s", "knit.dev/lb", false), nodes: threeNodes,
			held: []string{"198.18.0.1", "198.18.0.2", "198.18.0.3"}, want: "", reason: ReasonPortConflict},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, ip := range tt.current {
				tt.svc.Status.LoadBalancer.Ingress = append(tt.svc.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
			}
			held := func(ip netip.Addr) string {
				if slices.Contains(tt.held, ip.String()) {
					return "default/older"
				}
				return ""
			}
			p := choose(tt.svc, candidates(tt.nodes), tt.slices, tt.max, held)
			if got := ips(p); got != tt.want {
				t.Errorf("ingress %q, want %q", got, tt.want)
			}
			if p.cond.Reason != tt.reason || p.cond.Type != ConditionType {
				t.Errorf("condition %+v, want reason %s", p.cond, tt.reason)
			}
			for _, i := range p.ingress {
				if i.IPMode == nil || *i.IPMode != corev1.LoadBalancerIPModeVIP {
					t.Errorf("%s: ipMode %v, want VIP", i.IP, i.IPMode)
				}
			}
		})
	}
}

// TestChooseCapSpreads: with a cap, different Services land on different
// nodes (rendezvous hashing), and one node going away moves only the
// Services that had it.
func TestChooseCapSpreads(t *testing.T) {
	var nodes []*corev1.Node
	for i := range 10 {
		nodes = append(nodes, node(fmt.Sprintf("n%d", i), fmt.Sprintf("198.18.0.%d", i+1)))
	}
	cands := candidates(nodes)
	used := map[string]int{}
	before := map[string]string{}
	for i := range 50 {
		svc := lbService(fmt.Sprintf("s%d", i), "knit.dev/lb", false)
		p := choose(svc, cands, nil, 2, nil)
		if len(p.ingress) != 2 {
			t.Fatalf("%s: %d addresses, want 2", svc.Name, len(p.ingress))
		}
		for _, ing := range p.ingress {
			used[ing.IP]++
		}
		before[svc.Name] = ips(p)
	}
	if len(used) < 8 {
		t.Errorf("50 Services used only %d of 10 nodes: %v", len(used), used)
	}
	// Drop the node 198.18.0.1: Services that did not list it keep theirs.
	gone := "198.18.0.1"
	rest := slices.DeleteFunc(slices.Clone(cands), func(c candidate) bool { return c.ips[0].String() == gone })
	for i := range 50 {
		svc := lbService(fmt.Sprintf("s%d", i), "knit.dev/lb", false)
		for _, ip := range strings.Fields(before[svc.Name]) {
			svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
		}
		got := ips(choose(svc, rest, nil, 2, nil))
		had := slices.Contains(strings.Fields(before[svc.Name]), gone)
		if !had && got != before[svc.Name] {
			t.Errorf("%s moved from %q to %q though its nodes stayed", svc.Name, before[svc.Name], got)
		}
		if slices.Contains(strings.Fields(got), gone) {
			t.Errorf("%s still lists the removed node: %q", svc.Name, got)
		}
	}
}

func TestSameIngress(t *testing.T) {
	vip := corev1.LoadBalancerIPModeVIP
	proxy := corev1.LoadBalancerIPModeProxy
	a := []corev1.LoadBalancerIngress{{IP: "198.18.0.1"}}
	for _, tt := range []struct {
		name string
		b    []corev1.LoadBalancerIngress
		want bool
	}{
		{"nil mode is VIP", []corev1.LoadBalancerIngress{{IP: "198.18.0.1", IPMode: &vip}}, true},
		{"proxy mode differs", []corev1.LoadBalancerIngress{{IP: "198.18.0.1", IPMode: &proxy}}, false},
		{"other IP", []corev1.LoadBalancerIngress{{IP: "198.18.0.2"}}, false},
		{"ports differ", []corev1.LoadBalancerIngress{{IP: "198.18.0.1", Ports: []corev1.PortStatus{{Port: 1}}}}, false},
		{"empty", nil, false},
	} {
		if got := sameIngress(a, tt.b); got != tt.want {
			t.Errorf("%s: sameIngress = %v, want %v", tt.name, got, tt.want)
		}
	}
}
