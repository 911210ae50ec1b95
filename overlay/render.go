package overlay

import (
	"cmp"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
)

// skip records a peer, or one pod family of a peer, that gets no entries.
type skip struct {
	Peer   string
	Family family // pod family; meaningless when Whole
	Whole  bool   // the whole peer was rejected
	Err    *skipError
}

// rendered is the output of render: the desired kernel state plus what the
// metrics and logs report about it.
type rendered struct {
	desired
	Skips []skip
	// Programmed maps each peer that got at least one route to how it is
	// reached: "vxlan", "direct" or "mixed" (one family each way).
	Programmed map[string]string
	Peers      int // peers known (Nodes other than this one)
	PodMTU     int
}

// candidate is one peer podCIDR that passed the per-peer checks.
type candidate struct {
	peer    int // index into peers
	prefix  netip.Prefix
	overlap bool
	with    int // when overlap: the peer of one candidate it overlaps
}

// render computes the whole desired kernel state from this node's facts and
// every Node in the cache. It is a pure function: same input, same output,
// whatever order the Nodes come in.
func render(cfg *Config, loc localNode, nodes []*corev1.Node) rendered {
	out := rendered{Programmed: map[string]string{}}

	if cfg.Backend != BackendDirect {
		for _, u := range families {
			ul := loc.Underlay[u]
			if !ul.Addr.IsValid() {
				continue
			}
			d := device{
				Name:          deviceName(u),
				Underlay:      u,
				VNI:           cfg.VNI,
				Port:          cfg.Port,
				Local:         ul.Addr,
				UnderlayIndex: ul.LinkIndex,
				MTU:           ul.MTU - encapOverhead(u),
				MAC:           vtepMAC(loc.Name, deviceName(u)),
			}
			for _, f := range families {
				if pc := loc.PodCIDRs[f]; pc.IsValid() {
					d.Addrs = append(d.Addrs, netip.PrefixFrom(vtepAddr(pc), f.hostBits()))
				}
			}
			out.Devices = append(out.Devices, d)
		}
	}
	out.PodMTU = podMTU(cfg.Backend, loc, out.Devices)

	// Phase 1: parse every peer, in name order so that every tie below is
	// broken the same way on every node.
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b *corev1.Node) int { return cmp.Compare(a.Name, b.Name) })
	var peers []peer
	for _, n := range nodes {
		if n.Name == loc.Name {
			continue
		}
		out.Peers++
		p, err := parsePeer(n)
		if err != nil {
			out.Skips = append(out.Skips, skip{Peer: n.Name, Whole: true, Err: err})
			continue
		}
		peers = append(peers, p)
	}

	// Phase 2: per pod family, keep the podCIDRs that are inside the cluster
	// CIDRs and overlap nothing. A podCIDR overlapping this node's own is
	// wrong (this node's is its own Node's) and goes first, so that it
	// cannot take good peers down with it. PodCIDRs overlapping each other
	// are then all dropped, not first-come-first-served: which of two
	// conflicting peers is right is unknowable here, and a route to the
	// wrong one is worse than none.
	var accepted [2][]candidate
	for _, f := range families {
		own := loc.PodCIDRs[f]
		if !own.IsValid() {
			continue // this node is not in family f: nothing to route
		}
		var cands []candidate
		for i, p := range peers {
			pc := p.PodCIDRs[f]
			switch {
			case !pc.IsValid():
				out.Skips = append(out.Skips, skip{Peer: p.Name, Family: f,
					Err: skipf(reasonNoPodCIDR, "no %s podCIDR", f)})
			case !inClusterCIDRs(cfg.ClusterCIDRs, pc):
				out.Skips = append(out.Skips, skip{Peer: p.Name, Family: f,
					Err: skipf(reasonOutsideClusterCIDR, "podCIDR %s is outside the cluster CIDRs %v", pc, cfg.ClusterCIDRs)})
			case pc.Overlaps(own):
				out.Skips = append(out.Skips, skip{Peer: p.Name, Family: f,
					Err: skipf(reasonOverlapping, "podCIDR %s overlaps this node's %s", pc, own)})
			default:
				cands = append(cands, candidate{peer: i, prefix: pc})
			}
		}
		markOverlaps(cands)
		for _, c := range cands {
			switch {
			case c.overlap:
				other := peers[c.with]
				out.Skips = append(out.Skips, skip{Peer: peers[c.peer].Name, Family: f,
					Err: skipf(reasonOverlapping, "podCIDR %s overlaps %s's %s", c.prefix, other.Name, other.PodCIDRs[f])})
			default:
				accepted[f] = append(accepted[f], c)
			}
		}
		slices.SortFunc(accepted[f], func(a, b candidate) int { return cmp.Compare(a.peer, b.peer) })
	}

	// Phase 3: the path to each accepted podCIDR.
	devByFamily := [2]*device{}
	for i := range out.Devices {
		devByFamily[out.Devices[i].Underlay] = &out.Devices[i]
	}
	fdbOwner := map[string]string{} // dev/mac -> peer, to catch two peers claiming one MAC
	fdbSeen := map[string]bool{}    // dev/mac/dst already emitted
	for _, f := range families {
		for _, c := range accepted[f] {
			p := peers[c.peer]
			how, err := out.addPath(cfg, loc, devByFamily, p, f, c.prefix, fdbOwner, fdbSeen)
			if err != nil {
				out.Skips = append(out.Skips, skip{Peer: p.Name, Family: f, Err: err})
				continue
			}
			if prev, ok := out.Programmed[p.Name]; ok && prev != how {
				how = "mixed"
			}
			out.Programmed[p.Name] = how
		}
	}
	return out
}

// addPath adds the entries that reach peer p's podCIDR pc of pod family f
// and says which backend it used.
func (out *rendered) addPath(cfg *Config, loc localNode, devs [2]*device, p peer, f family, pc netip.Prefix,
	fdbOwner map[string]string, fdbSeen map[string]bool) (string, *skipError) {
	// Direct routing needs an underlay of the pod family on both ends, with
	// the peer's address on one of this node's links.
	if cfg.Backend == BackendDirect || cfg.Backend == BackendAuto {
		ul, pa := loc.Underlay[f], p.PublicIP[f]
		if ul.Addr.IsValid() && pa.IsValid() && ul.Prefix.Contains(pa) && pa != ul.Addr {
			out.Routes = append(out.Routes, route{Peer: p.Name, Dst: pc, Gw: pa, LinkIndex: ul.LinkIndex})
			return "direct", nil
		}
		if cfg.Backend == BackendDirect {
			switch {
			case !ul.Addr.IsValid():
				return "", skipf(reasonWrongFamily, "direct routing of %s pods needs an %s underlay on this node", f, f)
			case !pa.IsValid():
				return "", skipf(reasonMissingAnnotation, "no %s", publicIPKeys[f])
			default:
				return "", skipf(reasonNotSameSubnet, "%s %s is not in this node's underlay subnet %s", publicIPKeys[f], pa, ul.Prefix)
			}
		}
	}

	// VXLAN: prefer the underlay of the pod family, fall back to the other
	// one. Both ends apply the same preference to the same facts, so the
	// two directions of a flow use the same underlay family.
	var lacking *skipError
	for _, u := range []family{f, f.other()} {
		d := devs[u]
		if d == nil || !p.PublicIP[u].IsValid() {
			continue
		}
		if p.MAC[u] == nil {
			lacking = skipf(reasonMissingAnnotation, "%s is set but %s is not", publicIPKeys[u], vtepMACKeys[u])
			continue
		}
		key := d.Name + "/" + p.MAC[u].String()
		if owner, ok := fdbOwner[key]; ok && owner != p.Name {
			return "", skipf(reasonDuplicateMAC, "%s=%s is also published by %s", vtepMACKeys[u], p.MAC[u], owner)
		}
		fdbOwner[key] = p.Name
		if k := key + "/" + p.PublicIP[u].String(); !fdbSeen[k] {
			fdbSeen[k] = true
			out.FDB = append(out.FDB, fdbEntry{Dev: d.Name, MAC: p.MAC[u], Dst: p.PublicIP[u]})
		}
		gw := vtepAddr(pc)
		out.Neighs = append(out.Neighs, neigh{Dev: d.Name, IP: gw, MAC: p.MAC[u]})
		out.Routes = append(out.Routes, route{Peer: p.Name, Dst: pc, Gw: gw, Dev: d.Name})
		return "vxlan", nil
	}
	if lacking != nil {
		return "", lacking
	}
	if !p.PublicIP[v4].IsValid() && !p.PublicIP[v6].IsValid() {
		return "", skipf(reasonMissingAnnotation, "no %s or %s (is knit running there?)", AnnotationPublicIP, AnnotationPublicIPv6)
	}
	return "", skipf(reasonWrongFamily, "no underlay family in common (this node: %s)", underlayFamilies(loc))
}

func underlayFamilies(loc localNode) string {
	var s string
	for _, f := range families {
		if loc.Underlay[f].Addr.IsValid() {
			if s != "" {
				s += "+"
			}
			s += f.String()
		}
	}
	if s == "" {
		return "none"
	}
	return s
}

// podMTU is the MTU pods must use: the smallest VXLAN device MTU when any
// peer may be reached through VXLAN (also in auto mode: a peer can move to
// another subnet, and a pod's MTU cannot follow), the underlay MTU for
// direct routing only.
func podMTU(b Backend, loc localNode, devs []device) int {
	m := 0
	lower := func(v int) {
		if v > 0 && (m == 0 || v < m) {
			m = v
		}
	}
	if b == BackendDirect {
		for _, f := range families {
			if loc.Underlay[f].Addr.IsValid() {
				lower(loc.Underlay[f].MTU)
			}
		}
		return m
	}
	for _, d := range devs {
		lower(d.MTU)
	}
	return m
}

func inClusterCIDRs(cidrs []netip.Prefix, p netip.Prefix) bool {
	if len(cidrs) == 0 {
		return p.Bits() > 0 // no cluster CIDRs configured: anything but a default route
	}
	for _, c := range cidrs {
		if c.Bits() <= p.Bits() && c.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// markOverlaps flags every candidate whose prefix overlaps another's, and
// names one it overlaps (with). CIDR prefixes of one family either nest or
// are disjoint, so after sorting by first address (shorter first on ties)
// a prefix that starts inside the last one that started a run lies inside
// it; the run's first prefix overlaps its second. O(n log n): this runs on
// every sync with one candidate per node.
func markOverlaps(c []candidate) {
	slices.SortFunc(c, func(a, b candidate) int {
		if r := a.prefix.Addr().Compare(b.prefix.Addr()); r != 0 {
			return r
		}
		if r := cmp.Compare(a.prefix.Bits(), b.prefix.Bits()); r != 0 {
			return r
		}
		return cmp.Compare(a.peer, b.peer) // equal prefixes: same result every time
	})
	runStart := 0
	var runEnd netip.Addr
	for i := range c {
		if i > 0 && c[i].prefix.Addr().Compare(runEnd) <= 0 {
			c[i].overlap, c[i].with = true, c[runStart].peer
			if !c[runStart].overlap {
				c[runStart].overlap, c[runStart].with = true, c[i].peer
			}
			continue
		}
		runStart, runEnd = i, lastAddr(c[i].prefix)
	}
}

// lastAddr is the highest address in p.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr()
	b := a.AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	out, _ := netip.AddrFromSlice(b)
	return out
}
