package proxy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// family is an IP family. Every Service port is rendered once per family it
// has a ClusterIP in; the two renders share nothing but the table.
type family uint8

const (
	v4 family = 4
	v6 family = 6
)

func familyOf(a netip.Addr) family {
	if a.Is4() {
		return v4
	}
	return v6
}

func (f family) String() string {
	if f == v4 {
		return "v4"
	}
	return "v6"
}

// index is 0 for IPv4 and 1 for IPv6.
func (f family) index() int {
	if f == v4 {
		return 0
	}
	return 1
}

// ipX is the nft payload keyword for the family ("ip daddr", "ip6 daddr").
func (f family) ipX() string {
	if f == v4 {
		return "ip"
	}
	return "ip6"
}

// addrType is the nft set key type for the family.
func (f family) addrType() string {
	if f == v4 {
		return "ipv4_addr"
	}
	return "ipv6_addr"
}

// portKey names one port of a Service as EndpointSlices name it: the port
// name (empty for a single unnamed port) and the protocol.
type portKey struct {
	name  string
	proto string // "tcp", "udp", "sctp"
}

// servicePort is one (port, family) of a Service: everything the render needs
// and nothing else, so that two conversions of the same object compare equal.
type servicePort struct {
	portKey
	family      family
	port        uint16
	nodePort    uint16
	clusterIP   netip.Addr
	externalIPs []netip.Addr
	lbIPs       []netip.Addr
	// sourceRanges: loadBalancerSourceRanges of this family; empty means
	// any source (as does a range of prefix length 0).
	sourceRanges []netip.Prefix
	// sticky is the ClientIP affinity timeout; 0 means no affinity.
	sticky   time.Duration
	extLocal bool // externalTrafficPolicy Local (and externally reachable)
	intLocal bool // internalTrafficPolicy Local
	// nodeLocal: the ClusterIP is answered by a process on this node
	// (Config.LocalServiceIPs); no DNAT is rendered for it.
	nodeLocal bool
}

// externallyAccessible reports whether the port is reachable other than by
// its ClusterIP.
func (sp *servicePort) externallyAccessible() bool {
	return sp.nodePort != 0 || len(sp.externalIPs) > 0 || len(sp.lbIPs) > 0
}

// usesClusterEndpoints: ClusterIP traffic with policy Cluster, and any
// externally reachable port (pod and host traffic to external addresses
// short-circuits to the cluster endpoints even when the policy is Local).
func (sp *servicePort) usesClusterEndpoints() bool {
	return !sp.intLocal || sp.externallyAccessible()
}

func (sp *servicePort) usesLocalEndpoints() bool {
	return sp.intLocal || sp.extLocal
}

// serviceInfo is the converted Service: its ports in a stable order.
type serviceInfo struct {
	ports []servicePort
	// healthCheckNodePort is served when externalTrafficPolicy is Local.
	healthCheckNodePort uint16
}

// endpoint is one address:port of an EndpointSlice with its conditions.
// The proxy holds one per endpoint and Service port (100,000 at 10,000
// Services), so the rarely set hints are behind a pointer.
type endpoint struct {
	addr        netip.Addr
	port        uint16
	local       bool // on this node
	ready       bool
	serving     bool
	terminating bool
	hints       *endpointHints // nil: none
}

// endpointHints are an endpoint's topology hints, sorted.
type endpointHints struct {
	zones, nodes []string
}

func (e *endpoint) zoneHints() []string {
	if e.hints == nil {
		return nil
	}
	return e.hints.zones
}

func (e *endpoint) nodeHints() []string {
	if e.hints == nil {
		return nil
	}
	return e.hints.nodes
}

func (e *endpoint) hostPort() string { return netip.AddrPortFrom(e.addr, e.port).String() }

// sliceInfo is the converted EndpointSlice: per port, its endpoints.
type sliceInfo struct {
	family family
	ports  []slicePort
}

type slicePort struct {
	portKey
	endpoints []endpoint
}

// epKey names the endpoint list of one Service port in one family.
type epKey struct {
	portKey
	family family
}

// portEndpoints are a Service's endpoint lists, one per port and family,
// sorted by key: most Services have one, which a map would hold in a
// group of eight slots (about 600 bytes per Service).
type portEndpoints []epList

type epList struct {
	key epKey
	eps []endpoint // sorted by address and port, no duplicates
}

// get returns the list of k, nil if there is none.
func (pe portEndpoints) get(k epKey) []endpoint {
	for i := range pe {
		if pe[i].key == k {
			return pe[i].eps
		}
	}
	return nil
}

func compareEPKeys(a, b epKey) int {
	if c := strings.Compare(a.name, b.name); c != 0 {
		return c
	}
	if c := strings.Compare(a.proto, b.proto); c != 0 {
		return c
	}
	return int(a.family) - int(b.family)
}

// invalidFunc reports an object (or part of one) that rules cannot express.
type invalidFunc func(kind string, obj types.NamespacedName, reason string)

var protocols = map[corev1.Protocol]string{
	corev1.ProtocolTCP:  "tcp",
	corev1.ProtocolUDP:  "udp",
	corev1.ProtocolSCTP: "sctp",
}

// skipService reports Services that get no rules at all: headless and
// ExternalName Services are resolved by DNS, not by the proxy.
func skipService(svc *corev1.Service) bool {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return true
	}
	return svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone
}

// convertService turns a Service into its servicePorts. Parts the rules
// cannot express (port 0, unknown protocol, unparsable addresses) are dropped
// and reported through bad; the rest of the Service still works.
func convertService(svc *corev1.Service, localIPs []netip.Addr, bad invalidFunc) *serviceInfo {
	if svc == nil || skipService(svc) {
		return nil
	}
	name := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	clusterIPs := svc.Spec.ClusterIPs
	if len(clusterIPs) == 0 {
		clusterIPs = []string{svc.Spec.ClusterIP}
	}
	var cips []netip.Addr
	for _, s := range clusterIPs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			bad("Service", name, fmt.Sprintf("bad clusterIP %q", s))
			continue
		}
		cips = append(cips, a.Unmap())
	}
	if len(cips) == 0 {
		return nil
	}
	externalIPs := parseAddrs(svc.Spec.ExternalIPs, name, "externalIP", bad)
	var lbIPs []netip.Addr
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if ing.IP == "" || (ing.IPMode != nil && *ing.IPMode == corev1.LoadBalancerIPModeProxy) {
			// Proxy-mode load balancers deliver to the node, not to the VIP.
			continue
		}
		lbIPs = append(lbIPs, parseAddrs([]string{ing.IP}, name, "loadBalancer ingress IP", bad)...)
	}

	var ranges []netip.Prefix
	for _, r := range svc.Spec.LoadBalancerSourceRanges {
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		if err != nil {
			bad("Service", name, fmt.Sprintf("bad loadBalancerSourceRange %q", r))
			continue
		}
		ranges = append(ranges, p.Masked())
	}

	var sticky time.Duration
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		sticky = 10800 * time.Second // the API default
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			sticky = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	intLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	etpLocal := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal

	info := &serviceInfo{}
	for i := range svc.Spec.Ports {
		p := &svc.Spec.Ports[i]
		proto, ok := protocols[p.Protocol]
		if p.Protocol == "" {
			proto, ok = "tcp", true
		}
		if !ok {
			bad("Service", name, fmt.Sprintf("port %q: unknown protocol %q", p.Name, p.Protocol))
			continue
		}
		if p.Port <= 0 || p.Port > 65535 {
			bad("Service", name, fmt.Sprintf("port %q: bad port %d", p.Name, p.Port))
			continue
		}
		if p.NodePort < 0 || p.NodePort > 65535 {
			bad("Service", name, fmt.Sprintf("port %q: bad nodePort %d", p.Name, p.NodePort))
			continue
		}
		for _, cip := range cips {
			f := familyOf(cip)
			sp := servicePort{
				portKey:     portKey{name: p.Name, proto: proto},
				family:      f,
				port:        uint16(p.Port),
				nodePort:    uint16(p.NodePort),
				clusterIP:   cip,
				externalIPs: ofFamily(externalIPs, f),
				lbIPs:       ofFamily(lbIPs, f),
				sticky:      sticky,
				intLocal:    intLocal,
				nodeLocal:   slices.Contains(localIPs, cip),
			}
			sp.extLocal = etpLocal && sp.externallyAccessible()
			for _, r := range ranges {
				if familyOf(r.Addr()) != f {
					continue
				}
				if r.Bits() == 0 {
					// Allows everything: the same as no ranges at all.
					sp.sourceRanges = nil
					break
				}
				sp.sourceRanges = append(sp.sourceRanges, r)
			}
			info.ports = append(info.ports, sp)
		}
	}
	if etpLocal && svc.Spec.HealthCheckNodePort > 0 && svc.Spec.HealthCheckNodePort <= 65535 &&
		(svc.Spec.Type == corev1.ServiceTypeLoadBalancer) {
		info.healthCheckNodePort = uint16(svc.Spec.HealthCheckNodePort)
	}
	slices.SortFunc(info.ports, func(a, b servicePort) int {
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		if c := strings.Compare(a.proto, b.proto); c != 0 {
			return c
		}
		return int(a.family) - int(b.family)
	})
	return info
}

func parseAddrs(in []string, name types.NamespacedName, what string, bad invalidFunc) []netip.Addr {
	var out []netip.Addr
	for _, s := range in {
		a, err := netip.ParseAddr(strings.TrimSpace(s))
		if err != nil || a.Zone() != "" {
			bad("Service", name, fmt.Sprintf("bad %s %q", what, s))
			continue
		}
		out = append(out, a.Unmap())
	}
	return out
}

func ofFamily(in []netip.Addr, f family) []netip.Addr {
	var out []netip.Addr
	for _, a := range in {
		if familyOf(a) == f && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// sliceService returns the Service an EndpointSlice belongs to, or false for
// slices not managed for a Service.
func sliceService(s *discoveryv1.EndpointSlice) (types.NamespacedName, bool) {
	svc := s.Labels[discoveryv1.LabelServiceName]
	if svc == "" || s.Namespace == "" || s.Name == "" {
		return types.NamespacedName{}, false
	}
	return types.NamespacedName{Namespace: s.Namespace, Name: svc}, true
}

// convertSlice turns an EndpointSlice into its ports and endpoints. FQDN
// slices, ports without a number and unparsable addresses are dropped (and
// reported); the rest of the slice is kept.
func convertSlice(s *discoveryv1.EndpointSlice, nodeName string, bad invalidFunc) *sliceInfo {
	var f family
	switch s.AddressType {
	case discoveryv1.AddressTypeIPv4:
		f = v4
	case discoveryv1.AddressTypeIPv6:
		f = v6
	default:
		return nil // FQDN slices are not proxied
	}
	name := types.NamespacedName{Namespace: s.Namespace, Name: s.Name}
	var eps []endpoint
	for i := range s.Endpoints {
		e := &s.Endpoints[i]
		if len(e.Addresses) == 0 {
			continue
		}
		a, err := netip.ParseAddr(e.Addresses[0])
		if err != nil || familyOf(a.Unmap()) != f || a.Zone() != "" {
			bad("EndpointSlice", name, fmt.Sprintf("bad address %q", e.Addresses[0]))
			continue
		}
		ep := endpoint{
			addr:        a.Unmap(),
			local:       nodeName != "" && e.NodeName != nil && *e.NodeName == nodeName,
			ready:       e.Conditions.Ready == nil || *e.Conditions.Ready,
			serving:     e.Conditions.Serving == nil || *e.Conditions.Serving,
			terminating: e.Conditions.Terminating != nil && *e.Conditions.Terminating,
		}
		if h := e.Hints; h != nil && len(h.ForZones)+len(h.ForNodes) > 0 {
			ep.hints = &endpointHints{}
			for _, z := range h.ForZones {
				ep.hints.zones = append(ep.hints.zones, z.Name)
			}
			for _, n := range h.ForNodes {
				ep.hints.nodes = append(ep.hints.nodes, n.Name)
			}
			slices.Sort(ep.hints.zones)
			slices.Sort(ep.hints.nodes)
		}
		eps = append(eps, ep)
	}
	// Sorted (stable: of an address listed twice, the later one wins in
	// mergeSlices): a Service's only slice's lists are then its merged
	// lists (see shareSlice).
	slices.SortStableFunc(eps, func(a, b endpoint) int { return a.addr.Compare(b.addr) })
	out := &sliceInfo{family: f}
	for _, p := range s.Ports {
		pname := ""
		if p.Name != nil {
			pname = *p.Name
		}
		proto := "tcp"
		if p.Protocol != nil {
			var ok bool
			if proto, ok = protocols[*p.Protocol]; !ok {
				bad("EndpointSlice", name, fmt.Sprintf("port %q: unknown protocol %q", pname, *p.Protocol))
				continue
			}
		}
		if p.Port == nil || *p.Port <= 0 || *p.Port > 65535 {
			bad("EndpointSlice", name, fmt.Sprintf("port %q: no valid port number", pname))
			continue
		}
		// Sized once: these lists are the proxy's copy of every endpoint.
		sp := slicePort{portKey: portKey{name: pname, proto: proto}, endpoints: make([]endpoint, 0, len(eps))}
		for _, e := range eps {
			e.port = uint16(*p.Port)
			sp.endpoints = append(sp.endpoints, e)
		}
		out.ports = append(out.ports, sp)
	}
	return out
}

// lastChangeTrigger reads the endpoints.kubernetes.io/last-change-trigger-time
// annotation (the time of the Pod or Service change that caused this slice
// update); zero when absent or unparsable.
func lastChangeTrigger(s *discoveryv1.EndpointSlice) time.Time {
	v, ok := s.Annotations[corev1.EndpointsLastChangeTriggerTime]
	if !ok {
		return time.Time{}
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return time.Time{}
	}
	return t
}
