package doctor

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	mdns "github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/knftables"
)

type fakeTables struct {
	maps   map[string][]*knftables.Element
	chains map[string][]string
}

func (f *fakeTables) Elements(_ context.Context, name string) ([]*knftables.Element, error) {
	e, ok := f.maps[name]
	if !ok {
		return nil, errors.New("No such file or directory")
	}
	return e, nil
}

func (f *fakeTables) ChainRules(_ context.Context, chain string) ([]string, bool, error) {
	r, ok := f.chains[chain]
	return r, ok, nil
}

type fakeNet struct {
	routes map[string]RouteCheck
	mtu    int
	// delivers reports whether a probe of that size reaches the address.
	delivers func(ip netip.Addr, size int) bool
}

func (f *fakeNet) Route(ip netip.Addr) RouteCheck { return f.routes[ip.String()] }
func (f *fakeNet) Links() ([]Link, error) {
	return []Link{{Name: "knit-vx4", Role: RoleVXLAN, MTU: f.mtu}, {Name: "eth0", Role: RoleUnderlay, MTU: f.mtu + 50}}, nil
}
func (f *fakeNet) RouteMTU(netip.Addr) (int, error) { return f.mtu, nil }
func (f *fakeNet) ProbeMTU(_ context.Context, ip netip.Addr, size int) (bool, error) {
	return f.delivers(ip, size), nil
}

func TestInspect(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.43.0.20", ClusterIPs: []string{"10.43.0.20"},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromString("http")},
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromInt32(53)},
			}},
	}
	dnsSvc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: "kube-system"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.43.0.10", ClusterIPs: []string{"10.43.0.10"},
			Ports: []corev1.ServicePort{{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}}},
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "web-1", Namespace: "ns", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		Ports: []discoveryv1.EndpointPort{
			{Name: ptr("http"), Port: ptr(int32(8080))},
			{Name: ptr("dns"), Port: ptr(int32(53))},
		},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.42.1.5"}, NodeName: ptr("node2"), Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "web-0"}},
			{Addresses: []string{"10.42.0.7"}, NodeName: ptr("node1"), Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "web-1"}},
			{Addresses: []string{"10.42.2.9"}, NodeName: ptr("node3"), Conditions: discoveryv1.EndpointConditions{Ready: ptr(false)}},
		},
	}
	svcs := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	_ = svcs.Add(svc)
	_ = svcs.Add(dnsSvc)
	sls := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	_ = sls.Add(slice)

	const chain = "service-v4-ns/web/tcp/http"
	serviceIPs := []*knftables.Element{{Key: []string{"10.43.0.20", "tcp", "80"}, Value: []string{"goto " + chain}}}
	noEP := []*knftables.Element{{Key: []string{"10.43.0.20", "udp", "53"}, Value: []string{"goto reject-chain"}}}
	tests := []struct {
		name   string
		tables *fakeTables
		refuse string // dial target that is refused
		black  bool   // full-size probes are lost
		check  func(t *testing.T, r *NodeReport)
	}{
		{
			name: "inline DNAT rules",
			tables: &fakeTables{maps: map[string][]*knftables.Element{"service-ips-v4": serviceIPs, "no-endpoint-services-v4": noEP},
				chains: map[string][]string{chain: {
					"numgen random mod 2 0 meta l4proto tcp dnat ip to 10.42.0.7:8080",
					"meta l4proto tcp dnat ip to 10.42.1.5:8080",
				}}},
			check: func(t *testing.T, r *NodeReport) {
				want := []PortRules{
					{Port: "http", Protocol: "tcp", Number: 80, ClusterIP: "10.43.0.20", Map: "service-ips-v4", Verdict: "goto " + chain,
						Chain: chain, ChainFound: true, Endpoints: []string{"10.42.0.7:8080", "10.42.1.5:8080"}},
					{Port: "dns", Protocol: "udp", Number: 53, ClusterIP: "10.43.0.20", Map: "no-endpoint-services-v4", Verdict: "goto reject-chain",
						Chain: "service-v4-ns/web/udp/dns"},
				}
				if !slices.EqualFunc(r.Ports, want, func(a, b PortRules) bool {
					return a.Map == b.Map && a.Verdict == b.Verdict && a.Chain == b.Chain && a.ChainFound == b.ChainFound &&
						slices.Equal(a.Endpoints, b.Endpoints) && a.Number == b.Number && a.Protocol == b.Protocol
				}) {
					t.Errorf("ports:\n got %+v\nwant %+v", r.Ports, want)
				}
				var ok []string
				for _, p := range r.Probes {
					if p.OK {
						ok = append(ok, p.Kind+" "+p.Target)
					}
				}
				wantOK := []string{"clusterIP 10.43.0.20:80", "endpoint 10.42.0.7:8080", "endpoint 10.42.1.5:8080"}
				if !slices.Equal(ok, wantOK) {
					t.Errorf("successful probes %v, want %v (UDP and not-ready endpoints are not probed)", ok, wantOK)
				}
				if len(r.MTU) != 1 || r.MTU[0].Target != "10.42.1.5" || !r.MTU[0].SmallOK || !r.MTU[0].BigOK || r.MTU[0].Size != 1450 {
					t.Errorf("MTU probes %+v, want one passing 1450-byte probe to the endpoint on node2", r.MTU)
				}
				if r.DNS == nil || r.DNS.Rcode != "NOERROR" || !slices.Equal(r.DNS.Answers, []string{"10.43.0.20"}) || r.DNS.Server != "10.43.0.10:53" {
					t.Errorf("DNS %+v", r.DNS)
				}
				if len(r.Routes) != 2 || !r.Routes[0].Local || r.Routes[1].Dev != "knit-vx4" {
					t.Errorf("routes %+v", r.Routes)
				}
			},
		},
		{
			name: "endpoint map (more than 32 endpoints)",
			tables: &fakeTables{maps: map[string][]*knftables.Element{"service-ips-v4": serviceIPs, "no-endpoint-services-v4": noEP,
				chain + "/endpoints": {{Key: []string{"0"}, Value: []string{"10.42.0.7", "8080"}}, {Key: []string{"1"}, Value: []string{"10.42.1.5", "8080"}}}},
				chains: map[string][]string{chain: {`meta l4proto tcp dnat ip addr . port to numgen random mod 2 map @"` + chain + `/endpoints"`}}},
			check: func(t *testing.T, r *NodeReport) {
				if got := r.Ports[0].Endpoints; !slices.Equal(got, []string{"10.42.0.7:8080", "10.42.1.5:8080"}) {
					t.Errorf("endpoints %v", got)
				}
			},
		},
		{
			name: "shared pick chain and endpoints map (ClusterIP-only ports)",
			tables: &fakeTables{maps: map[string][]*knftables.Element{
				"service-ips-v4":          {{Key: []string{"10.43.0.20", "tcp", "80"}, Value: []string{"goto pick-v4-tcp-2"}}},
				"no-endpoint-services-v4": noEP,
				"endpoints-v4-tcp": {
					{Key: []string{"10.43.0.20", "80", "0"}, Value: []string{"10.42.0.7", "8080"}},
					{Key: []string{"10.43.0.20", "80", "1"}, Value: []string{"10.42.1.5", "8080"}},
					{Key: []string{"10.43.0.99", "80", "0"}, Value: []string{"10.42.9.9", "80"}}, // another Service
					{Key: []string{"10.43.0.20", "81", "0"}, Value: []string{"10.42.9.8", "81"}}, // another port
				}},
				chains: map[string][]string{"pick-v4-tcp-2": {"meta l4proto tcp dnat ip addr . port to ip daddr . tcp dport . numgen random mod 2 map @endpoints-v4-tcp"}}},
			check: func(t *testing.T, r *NodeReport) {
				if p := r.Ports[0]; p.Chain != "pick-v4-tcp-2" || !p.ChainFound || !slices.Equal(p.Endpoints, []string{"10.42.0.7:8080", "10.42.1.5:8080"}) {
					t.Errorf("port %+v, want pick-v4-tcp-2 with this Service's two endpoints only", p)
				}
			},
		},
		{
			name: "session affinity: endpoint chains",
			tables: &fakeTables{maps: map[string][]*knftables.Element{"service-ips-v4": serviceIPs, "no-endpoint-services-v4": noEP},
				chains: map[string][]string{
					chain: {"ip saddr @affinity-v4-ns/web/tcp/http__10.42.1.5/8080 goto endpoint-v4-ns/web/tcp/http__10.42.1.5/8080",
						"goto endpoint-v4-ns/web/tcp/http__10.42.1.5/8080"},
					"endpoint-v4-ns/web/tcp/http__10.42.1.5/8080": {"update @affinity-v4-ns/web/tcp/http__10.42.1.5/8080 { ip saddr }",
						"meta l4proto tcp dnat ip to 10.42.1.5:8080"},
				}},
			check: func(t *testing.T, r *NodeReport) {
				if got := r.Ports[0].Endpoints; !slices.Equal(got, []string{"10.42.1.5:8080"}) {
					t.Errorf("endpoints %v", got)
				}
			},
		},
		{
			name:   "rules missing, endpoint refuses, big packets lost",
			tables: &fakeTables{maps: map[string][]*knftables.Element{"service-ips-v4": nil, "no-endpoint-services-v4": nil}},
			refuse: "10.42.1.5:8080",
			black:  true,
			check: func(t *testing.T, r *NodeReport) {
				if r.Ports[0].Map != "" || r.Ports[0].ChainFound {
					t.Errorf("port %+v, want no element and no chain", r.Ports[0])
				}
				for _, p := range r.Probes {
					if p.Target == "10.42.1.5:8080" && (p.OK || !p.Refused) {
						t.Errorf("probe %+v, want refused", p)
					}
				}
				if len(r.MTU) != 1 || !r.MTU[0].SmallOK || r.MTU[0].BigOK {
					t.Errorf("MTU %+v, want small ok, big lost", r.MTU)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := &Inspector{
				Node: "node1", Domain: "cluster.local", DNS: []netip.Addr{netip.MustParseAddr("10.43.0.10")},
				Services: corelisters.NewServiceLister(svcs),
				Slices:   discoverylisters.NewEndpointSliceLister(sls),
				Tables:   tt.tables,
				Net: &fakeNet{mtu: 1450,
					routes:   map[string]RouteCheck{"10.42.1.5": {Knit: true, Dst: "10.42.1.0/24", Dev: "knit-vx4", Gateway: "10.42.1.0"}},
					delivers: func(_ netip.Addr, size int) bool { return !tt.black || size < 1000 }},
				Dial: func(_ context.Context, _, addr string) (net.Conn, error) {
					if addr == tt.refuse {
						return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
					}
					a, b := net.Pipe()
					b.Close()
					return a, nil
				},
				Query: func(_ context.Context, _, name string, _ uint16) (*mdns.Msg, error) {
					m := new(mdns.Msg)
					rr, _ := mdns.NewRR(name + " 5 IN A 10.43.0.20")
					m.Answer = []mdns.RR{rr}
					return m, nil
				},
			}
			tt.check(t, in.Inspect(context.Background(), "ns", "web", true))
		})
	}

	t.Run("iptables backend: rules not read", func(t *testing.T) {
		in := &Inspector{Node: "node1", Services: corelisters.NewServiceLister(svcs), Slices: discoverylisters.NewEndpointSliceLister(sls),
			Tables: &fakeTables{}, ProxyBackend: func() string { return "iptables-nft" }}
		r := in.Inspect(context.Background(), "ns", "web", false)
		if len(r.Ports) != 0 || !strings.Contains(r.RulesNote, "iptables-nft") || len(r.Errors) != 0 {
			t.Errorf("ports %+v note %q errors %v", r.Ports, r.RulesNote, r.Errors)
		}
	})

	t.Run("cluster DNS answered locally", func(t *testing.T) {
		in := &Inspector{Node: "node1", Domain: "cluster.local", DNS: []netip.Addr{netip.MustParseAddr("10.43.0.10")},
			Services: corelisters.NewServiceLister(svcs), Slices: discoverylisters.NewEndpointSliceLister(sls),
			Tables: &fakeTables{}, Query: func(context.Context, string, string, uint16) (*mdns.Msg, error) { return new(mdns.Msg), nil }}
		r := in.Inspect(context.Background(), "kube-system", "kube-dns", false)
		if len(r.Ports) != 1 || !r.Ports[0].Local || len(r.Errors) != 0 {
			t.Errorf("ports %+v errors %v, want one local port and no nftables lookups", r.Ports, r.Errors)
		}
	})
}
