package proxy

import (
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// FuzzConvertAndRender feeds arbitrary addresses, ports and protocols
// through conversion and rendering: bad input must be skipped, never panic,
// and whatever is rendered must name only valid addresses.
func FuzzConvertAndRender(f *testing.F) {
	f.Add("10.43.0.1", "192.0.2.1", "TCP", int32(80), int32(30080), "10.42.1.5", int32(8080), "UDP")
	f.Add("fd43::1", "::ffff:1.2.3.4", "SCTP", int32(0), int32(-1), "fd42::5", int32(0), "ICMP")
	f.Add("None", "", "", int32(70000), int32(65536), "not-an-ip", int32(-5), "")
	f.Fuzz(func(t *testing.T, cip, extIP, proto string, port, nodePort int32, epIP string, epPort int32, epProto string) {
		svc := service("ns", "s", cip, withExternalIPs(extIP), withPorts(corev1.ServicePort{
			Name: "p", Port: port, NodePort: nodePort, Protocol: corev1.Protocol(proto),
		}))
		info := convertService(svc, []netip.Addr{netip.MustParseAddr("10.43.0.10")}, quiet)
		sl := slice("ns", "s", "s-1", 1, nil, withSlicePorts(discoveryv1.EndpointPort{
			Name: ptr("p"), Port: ptr(epPort), Protocol: ptr(corev1.Protocol(epProto)),
		}))
		sl.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{epIP}, NodeName: ptr(thisNode)}}
		if a, err := netip.ParseAddr(epIP); err == nil && a.Is6() && !a.Is4In6() {
			sl.AddressType = discoveryv1.AddressTypeIPv6
		}
		si := convertSlice(sl, thisNode, quiet)
		if info == nil {
			return
		}
		var eps portEndpoints
		if si != nil {
			eps = mergeSlices(map[string]*sliceInfo{"s-1": si})
		}
		r := &renderer{masqMark: "0x4000", clusterCIDRs: map[family]string{v4: "10.42.0.0/16"}, topo: topology{node: thisNode}}
		rd := r.renderService(types.NamespacedName{Namespace: "ns", Name: "s"}, info, eps)
		for _, sp := range info.ports {
			if sp.port == 0 || !sp.clusterIP.IsValid() {
				t.Fatalf("invalid port rendered: %+v", sp)
			}
		}
		for _, el := range rd.elements {
			for _, k := range strings.Split(el.key, keySep) {
				if k == "" {
					t.Fatalf("empty key in %+v", el)
				}
			}
		}
	})
}
