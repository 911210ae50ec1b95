package proxy

import (
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"
)

// UDP has no connection to close: a client keeps sending to a conntrack entry
// that DNATs to an endpoint that is gone, for as long as it keeps the entry
// alive (kubernetes #19029, #59368, #125467). After a sync, entries whose
// original destination is a UDP Service frontend and whose reply source is
// not a serving endpoint of that Service are deleted, so the next packet is
// NATed afresh by the new rules.

// conntracker deletes conntrack entries; the real one talks netlink, tests
// use a fake.
type conntracker interface {
	deleteUDP(f family, filter *staleUDPFilter) (uint, error)
}

type netlinkConntrack struct{}

func (netlinkConntrack) deleteUDP(f family, filter *staleUDPFilter) (uint, error) {
	fam := netlink.InetFamily(unix.AF_INET)
	if f == v6 {
		fam = unix.AF_INET6
	}
	return netlink.ConntrackDeleteFilters(netlink.ConntrackTable, fam, filter)
}

// staleUDPFilter matches UDP entries to a frontend that do not go to one of
// that frontend's serving endpoints.
type staleUDPFilter struct {
	// frontends: Service address:port -> serving endpoints.
	frontends map[netip.AddrPort]map[netip.AddrPort]bool
	// nodePorts: NodePort -> serving endpoints. Matched on the port only,
	// and only for Services that still have endpoints (an empty set would
	// delete unrelated flows to that port number).
	nodePorts map[uint16]map[netip.AddrPort]bool
}

func (s *staleUDPFilter) empty() bool { return len(s.frontends) == 0 && len(s.nodePorts) == 0 }

// MatchConntrackFlow implements netlink.CustomConntrackFilter.
func (s *staleUDPFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	if flow.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	dst, ok := netip.AddrFromSlice(flow.Forward.DstIP)
	if !ok {
		return false
	}
	replySrc, ok := netip.AddrFromSlice(flow.Reverse.SrcIP)
	if !ok {
		return false
	}
	backend := netip.AddrPortFrom(replySrc.Unmap(), flow.Reverse.SrcPort)
	if eps, ok := s.frontends[netip.AddrPortFrom(dst.Unmap(), flow.Forward.DstPort)]; ok {
		return !eps[backend]
	}
	if eps, ok := s.nodePorts[flow.Forward.DstPort]; ok {
		return !eps[backend]
	}
	return false
}

// staleUDPFilters builds one filter per family for the UDP ports of the
// changed Services (their current frontends, and the frontends they had
// before, which now have no endpoint at all).
func staleUDPFilters(st *state, before map[types.NamespacedName]*serviceInfo, changed map[types.NamespacedName]bool) map[family]*staleUDPFilter {
	out := map[family]*staleUDPFilter{}
	get := func(f family) *staleUDPFilter {
		if out[f] == nil {
			out[f] = &staleUDPFilter{frontends: map[netip.AddrPort]map[netip.AddrPort]bool{}, nodePorts: map[uint16]map[netip.AddrPort]bool{}}
		}
		return out[f]
	}
	add := func(info *serviceInfo, eps portEndpoints, current bool) {
		for i := range info.ports {
			sp := &info.ports[i]
			if sp.proto != "udp" || sp.nodeLocal {
				continue
			}
			serving := map[netip.AddrPort]bool{}
			if current {
				for _, e := range eps.get(epKey{portKey: sp.portKey, family: sp.family}) {
					// Any serving endpoint is fine: changes of policy or
					// topology must not break existing flows, as for TCP.
					if e.serving {
						serving[netip.AddrPortFrom(e.addr, e.port)] = true
					}
				}
			}
			flt := get(sp.family)
			for _, a := range append(append([]netip.Addr{sp.clusterIP}, sp.externalIPs...), sp.lbIPs...) {
				k := netip.AddrPortFrom(a, sp.port)
				if _, ok := flt.frontends[k]; !ok || current {
					flt.frontends[k] = serving
				}
			}
			if sp.nodePort != 0 && len(serving) > 0 {
				flt.nodePorts[sp.nodePort] = serving
			}
		}
	}
	for name := range changed {
		if old := before[name]; old != nil {
			add(old, nil, false)
		}
	}
	for name := range changed {
		if info := st.services[name]; info != nil {
			add(info, st.endpoints[name], true)
		}
	}
	for f, flt := range out {
		if flt.empty() {
			delete(out, f)
		}
	}
	return out
}
