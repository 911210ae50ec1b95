package proxy

import "slices"

// endpointSets is the outcome of choosing endpoints for one service port on
// this node (kube-proxy's CategorizeEndpoints, same rules):
//
//   - cluster: endpoints for policy Cluster: Ready ones, narrowed by topology
//     hints when the hints allow it; when no endpoint is Ready anywhere,
//     the Serving-and-Terminating ones (graceful termination).
//   - local: endpoints on this node for policy Local: Ready local ones, or
//     else Serving-and-Terminating local ones.
//   - reachable: the union, i.e. every endpoint this node may DNAT to.
//   - any: whether the Service has a usable endpoint anywhere at all; false
//     means connections are rejected at once.
type endpointSets struct {
	cluster, local, reachable []endpoint
	any                       bool
}

// portPlan is what a port's traffic policies make of its endpoint sets,
// the same for both backends (nft and iptables): whether the Cluster and
// Local policy chains are used at all, which of them internal (ClusterIP)
// and external (NodePort, external and LB IPs) traffic goes to, and
// whether that traffic has an endpoint (else it is rejected or dropped).
type portPlan struct {
	usesCluster, usesLocal, usesExternal bool
	internalLocal, externalLocal         bool // the Local chain, not the Cluster one
	hasInternal, hasExternal             bool
}

func planPort(sp *servicePort, es endpointSets) portPlan {
	p := portPlan{
		usesCluster:   len(es.cluster) > 0 && sp.usesClusterEndpoints(),
		usesLocal:     len(es.local) > 0 && sp.usesLocalEndpoints(),
		usesExternal:  es.any && sp.externallyAccessible(),
		internalLocal: sp.intLocal,
		externalLocal: sp.extLocal,
		hasInternal:   es.any,
		hasExternal:   es.any,
	}
	if sp.intLocal {
		p.hasInternal = len(es.local) > 0
	}
	if sp.extLocal {
		p.hasExternal = len(es.local) > 0
	}
	return p
}

// chains names the policy chains internal and external traffic go to.
func (p portPlan) chains(clusterChain, localChain string) (internal, external string) {
	internal, external = clusterChain, clusterChain
	if p.internalLocal {
		internal = localChain
	}
	if p.externalLocal {
		external = localChain
	}
	return internal, external
}

// topology is what this node knows about itself for hints.
type topology struct {
	node string
	zone string
}

func categorize(eps []endpoint, sp *servicePort, topo topology) endpointSets {
	var out endpointSets
	if len(eps) == 0 {
		return out
	}
	if sp.usesClusterEndpoints() {
		mode := topologyMode(eps, topo)
		out.cluster = filter(eps, func(e *endpoint) bool { return e.ready && availableFor(e, mode, topo) })
		if len(out.cluster) == 0 {
			out.cluster = filter(eps, func(e *endpoint) bool { return e.serving && e.terminating })
		}
		out.any = len(out.cluster) > 0
	}
	if !sp.usesLocalEndpoints() {
		out.reachable = out.cluster
		return out
	}
	var localReady, localTerminating bool
	for i := range eps {
		e := &eps[i]
		switch {
		case e.ready:
			out.any = true
			localReady = localReady || e.local
		case e.serving && e.terminating:
			out.any = true
			localTerminating = localTerminating || e.local
		}
	}
	switch {
	case localReady:
		out.local = filter(eps, func(e *endpoint) bool { return e.local && e.ready })
	case localTerminating:
		out.local = filter(eps, func(e *endpoint) bool { return e.local && e.serving && e.terminating })
	}
	if !sp.usesClusterEndpoints() {
		out.reachable = out.local
		return out
	}
	// Union of both lists, sorted, without duplicates.
	out.reachable = append(slices.Clone(out.cluster), out.local...)
	sortEndpoints(out.reachable)
	out.reachable = slices.CompactFunc(out.reachable, func(a, b endpoint) bool {
		return a.addr == b.addr && a.port == b.port
	})
	return out
}

const (
	modeNone     = ""
	modeSameNode = "PreferSameNode"
	modeSameZone = "PreferSameZone"
)

// topologyMode decides from the hints the EndpointSlice controller wrote
// (for trafficDistribution PreferSameNode/PreferSameZone, or topology-aware
// hints): same-node when every Ready endpoint has a node hint and one names
// this node; else same-zone when every Ready endpoint has a zone hint and
// one names this zone; else none. Hints that would leave this node without
// an endpoint are ignored, so hints never black-hole traffic.
func topologyMode(eps []endpoint, topo topology) string {
	anyReady, allNode, allZone, forNode, forZone := false, true, true, false, false
	for i := range eps {
		e := &eps[i]
		if !e.ready {
			continue
		}
		anyReady = true
		if len(e.nodeHints()) == 0 {
			allNode = false
		} else if slices.Contains(e.nodeHints(), topo.node) {
			forNode = true
		}
		if len(e.zoneHints()) == 0 {
			allZone = false
		} else if topo.zone != "" && slices.Contains(e.zoneHints(), topo.zone) {
			forZone = true
		}
	}
	switch {
	case !anyReady:
		return modeNone
	case allNode && forNode:
		return modeSameNode
	case allZone && forZone:
		return modeSameZone
	}
	return modeNone
}

func availableFor(e *endpoint, mode string, topo topology) bool {
	switch mode {
	case modeSameNode:
		return slices.Contains(e.nodeHints(), topo.node)
	case modeSameZone:
		return slices.Contains(e.zoneHints(), topo.zone)
	}
	return true
}

// filter returns the endpoints that keep keeps: eps itself if it keeps all
// (the common case, and lists are never changed once made), else a new list.
func filter(eps []endpoint, keep func(*endpoint) bool) []endpoint {
	for i := range eps {
		if keep(&eps[i]) {
			continue
		}
		out := slices.Clip(eps[:i])
		for j := i + 1; j < len(eps); j++ {
			if keep(&eps[j]) {
				out = append(out, eps[j])
			}
		}
		return out
	}
	return eps
}
