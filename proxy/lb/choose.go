package lb

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/cluster"
)

// ConditionType is the status condition knit keeps on every Service it
// serves; it marks status.loadBalancer as written by knit.
const ConditionType = "knit.dev/LoadBalancer"

// Condition reasons.
const (
	ReasonNodesChosen  = "NodesChosen"
	ReasonNoNodes      = "NoEligibleNodes"
	ReasonPortConflict = "PortConflict"
	ReasonReservedPort = "ReservedPort"
)

// candidate is a node that can serve LoadBalancer traffic.
type candidate struct {
	name string
	ips  []netip.Addr // InternalIPs, sorted
}

// candidates returns the nodes that can serve: Ready, not being deleted,
// not excluded by label, with at least one InternalIP. Sorted by name.
func candidates(nodes []*corev1.Node) []candidate {
	var out []candidate
	for _, n := range nodes {
		if !nodeCanServe(n) {
			continue
		}
		c := candidate{name: n.Name, ips: internalIPs(n)}
		if len(c.ips) > 0 {
			out = append(out, c)
		}
	}
	slices.SortFunc(out, func(a, b candidate) int { return strings.Compare(a.name, b.name) })
	return out
}

func nodeCanServe(n *corev1.Node) bool {
	if n.DeletionTimestamp != nil {
		return false
	}
	if _, excluded := n.Labels[corev1.LabelNodeExcludeBalancers]; excluded {
		return false
	}
	return cluster.NodeReady(n)
}

func internalIPs(n *corev1.Node) []netip.Addr {
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Zone() == "" && !slices.Contains(out, ip.Unmap()) {
			out = append(out, ip.Unmap())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// nodeView is the part of a Node that changes what the load balancer
// writes; a Node update that leaves it alone is ignored.
func nodeView(n *corev1.Node) string {
	if !nodeCanServe(n) {
		return ""
	}
	var b strings.Builder
	for _, ip := range internalIPs(n) {
		b.WriteString(ip.String())
		b.WriteByte(' ')
	}
	return b.String()
}

// plan is what one Service's status should say.
type plan struct {
	ingress []corev1.LoadBalancerIngress
	cond    metav1.Condition
}

// slot is one address's protocol and port: what a LoadBalancer Service
// takes on a node address. Two Services cannot share a slot.
type slot struct {
	ip    netip.Addr
	proto corev1.Protocol
	port  int32
}

// slots are the Service's slots on ip.
func slots(svc *corev1.Service, ip netip.Addr) []slot {
	var out []slot
	for _, p := range svc.Spec.Ports {
		proto := p.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		out = append(out, slot{ip, proto, p.Port})
	}
	return out
}

// holderFunc says which other Service, if any, holds one of svc's slots on
// ip ("" for none).
type holderFunc func(ip netip.Addr) string

// choose decides the addresses of one Service that knit serves. nodes are
// the candidates (see candidates); eps are the Service's EndpointSlices
// (read only for externalTrafficPolicy Local); maxNodes caps the nodes
// listed (0: no cap); held reports addresses whose port another Service
// already has (nil: none).
func choose(svc *corev1.Service, nodes []candidate, eps []*discoveryv1.EndpointSlice, maxNodes int, held holderFunc) plan {
	fams := families(svc)
	local := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	var withEndpoint map[string]bool
	if local {
		withEndpoint = readyEndpointNodes(eps)
	}
	current := map[string]bool{}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		current[ing.IP] = true
	}

	type pick struct {
		candidate
		listed bool
		weight uint64
	}
	var picks []pick
	conflicts, conflictWith := 0, ""
	for _, n := range nodes {
		if local && !withEndpoint[n.name] {
			continue
		}
		var ips []netip.Addr
		blocked := false
		for _, ip := range n.ips {
			if !fams[ip.Is4()] {
				continue
			}
			if h := holder(held, ip); h != "" {
				blocked = true
				if conflictWith == "" {
					conflictWith = h
				}
				continue
			}
			ips = append(ips, ip)
		}
		if blocked {
			conflicts++
		}
		if len(ips) == 0 {
			continue
		}
		p := pick{candidate: candidate{name: n.name, ips: ips}, weight: rendezvous(string(svc.UID), n.name)}
		for _, ip := range ips {
			p.listed = p.listed || current[ip.String()]
		}
		picks = append(picks, p)
	}
	// Listed nodes first (stability), then by rendezvous weight.
	slices.SortFunc(picks, func(a, b pick) int {
		switch {
		case a.listed != b.listed:
			if a.listed {
				return -1
			}
			return 1
		case a.weight != b.weight:
			if a.weight > b.weight {
				return -1
			}
			return 1
		}
		return strings.Compare(a.name, b.name)
	})
	if maxNodes > 0 && len(picks) > maxNodes {
		picks = picks[:maxNodes]
	}

	var p plan
	var names []string
	var ips []netip.Addr
	for _, pk := range picks {
		names = append(names, pk.name)
		ips = append(ips, pk.ips...)
	}
	slices.Sort(names)
	slices.SortFunc(ips, netip.Addr.Compare)
	for _, ip := range slices.Compact(ips) {
		p.ingress = append(p.ingress, corev1.LoadBalancerIngress{IP: ip.String(), IPMode: new(corev1.LoadBalancerIPModeVIP)})
	}
	p.cond = metav1.Condition{Type: ConditionType, ObservedGeneration: svc.Generation}
	conflict := ""
	if conflicts > 0 {
		conflict = fmt.Sprintf("; %d node(s) skipped: a port is taken there by %s", conflicts, conflictWith)
	}
	switch {
	case len(names) > 0:
		p.cond.Status, p.cond.Reason = metav1.ConditionTrue, ReasonNodesChosen
		p.cond.Message = "served by knit on " + strings.Join(names, ", ") + conflict
	case conflicts > 0:
		p.cond.Status, p.cond.Reason = metav1.ConditionFalse, ReasonPortConflict
		p.cond.Message = fmt.Sprintf("every eligible node's address has a port of this Service taken by an older Service (%s)", conflictWith)
	case local:
		p.cond.Status, p.cond.Reason = metav1.ConditionFalse, ReasonNoNodes
		p.cond.Message = "externalTrafficPolicy Local: no Ready node has a ready endpoint of this Service"
	default:
		p.cond.Status, p.cond.Reason = metav1.ConditionFalse, ReasonNoNodes
		p.cond.Message = "no Ready node has an InternalIP of this Service's IP families"
	}
	return p
}

func holder(held holderFunc, ip netip.Addr) string {
	if held == nil {
		return ""
	}
	return held(ip)
}

// families returns the Service's IP families as a set keyed by "is IPv4".
func families(svc *corev1.Service) map[bool]bool {
	out := map[bool]bool{}
	for _, f := range svc.Spec.IPFamilies {
		out[f == corev1.IPv4Protocol] = true
	}
	if len(out) == 0 {
		for _, s := range append([]string{svc.Spec.ClusterIP}, svc.Spec.ClusterIPs...) {
			if ip, err := netip.ParseAddr(s); err == nil {
				out[ip.Unmap().Is4()] = true
			}
		}
	}
	if len(out) == 0 {
		out[true], out[false] = true, true
	}
	return out
}

// readyEndpointNodes are the nodes holding a ready endpoint. Ready is
// false for terminating endpoints, so a node whose endpoints are all
// draining is left out while they drain.
func readyEndpointNodes(eps []*discoveryv1.EndpointSlice) map[string]bool {
	out := map[string]bool{}
	for _, s := range eps {
		if s.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		for _, e := range s.Endpoints {
			ready := e.Conditions.Ready == nil || *e.Conditions.Ready
			if ready && e.NodeName != nil && *e.NodeName != "" {
				out[*e.NodeName] = true
			}
		}
	}
	return out
}

// rendezvous is the highest-random-weight hash of a Service and a node.
func rendezvous(svcUID, node string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(svcUID))
	h.Write([]byte{0})
	h.Write([]byte(node))
	// FNV's last bytes barely reach the high bits; finish with murmur3's
	// fmix64 so that names differing in one character still spread.
	x := h.Sum64()
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// sameIngress compares load-balancer addresses, reading a missing IPMode
// as VIP (the API server's default).
func sameIngress(a, b []corev1.LoadBalancerIngress) bool {
	return slices.EqualFunc(a, b, func(x, y corev1.LoadBalancerIngress) bool {
		return x.IP == y.IP && x.Hostname == y.Hostname && ipMode(x) == ipMode(y) && len(x.Ports) == 0 && len(y.Ports) == 0
	})
}

func ipMode(i corev1.LoadBalancerIngress) corev1.LoadBalancerIPMode {
	if i.IPMode == nil {
		return corev1.LoadBalancerIPModeVIP
	}
	return *i.IPMode
}
