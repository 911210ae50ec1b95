package proxy

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/types"
)

// The iptables backend's chains. The names follow kube-proxy's iptables
// mode with the prefix KNIT- (so the two never share a chain), and so does
// the packet flow:
//
//	nat PREROUTING, OUTPUT ─► KNIT-SERVICES (nat)
//	    one rule per ClusterIP, ExternalIP and LoadBalancer IP port:
//	        -d <ip> -p <proto> --dport <port> -j KNIT-SVC-… | KNIT-SVL-… | KNIT-EXT-… | KNIT-FW-…
//	    last: local destination (not loopback) ─► KNIT-NODEPORTS
//	        -p <proto> --dport <nodePort> -j KNIT-EXT-…
//	KNIT-EXT-…  external traffic: Cluster: mark for masquerade, ─► KNIT-SVC-…;
//	            Local: pods and the node ─► KNIT-SVC-… (node masqueraded),
//	            others ─► KNIT-SVL-… (client address kept)
//	KNIT-FW-…   loadBalancerSourceRanges: allowed sources ─► KNIT-EXT-…; the
//	            rest falls through un-DNATed and is dropped by
//	            KNIT-PROXY-FIREWALL in the filter table
//	KNIT-SVC-…  policy Cluster, KNIT-SVL-… policy Local: ClusterIP traffic
//	            from outside the cluster CIDRs ─► KNIT-MARK-OUTSIDE (masquerade);
//	            affinity (-m recent --rcheck); then one endpoint at random
//	            (-m statistic --mode random, rule i with probability 1/(n-i)),
//	            DNAT in the same rule, or for local endpoints and with
//	            affinity ─► KNIT-SEP-…
//	KNIT-SEP-…  one endpoint: its own traffic is marked (hairpin, local
//	            endpoints), affinity recorded (-m recent --set), DNAT
//	nat POSTROUTING ─► KNIT-POSTROUTING: marked? clear the mark, MASQUERADE
//
//	filter INPUT, FORWARD, OUTPUT (new connections only)
//	    KNIT-PROXY-FIREWALL     LB IP traffic the KNIT-FW chain did not DNAT: drop
//	    KNIT-SERVICES           ClusterIP ports without endpoints: reject (or
//	                            drop: internalTrafficPolicy Local, none here);
//	                            then the service CIDRs ─► KNIT-CLUSTER-IPS
//	    KNIT-EXTERNAL-SERVICES  ExternalIP, LB IP and NodePort ports without
//	                            endpoints: reject (or drop: Local, none here)
//	    KNIT-CLUSTER-IPS        a ClusterIP on an undefined port: reject; an
//	                            unallocated address in the service CIDRs: drop
//
// The mark is cleared in KNIT-POSTROUTING before MASQUERADE, for the same
// reason as in the nftables table (kubernetes #88986, see the package doc).
//
// Per-Service chain names are hashed as kube-proxy's are (iptables allows
// 28 characters); their rules carry the readable "namespace/name:port" as a
// comment.
const (
	iptServices      = "KNIT-SERVICES" // in nat and in filter
	iptNodePorts     = "KNIT-NODEPORTS"
	iptPostrouting   = "KNIT-POSTROUTING"
	iptMarkMasq      = "KNIT-MARK-MASQ"
	iptMarkOutside   = "KNIT-MARK-OUTSIDE"
	iptExternal      = "KNIT-EXTERNAL-SERVICES"
	iptFirewall      = "KNIT-PROXY-FIREWALL"
	iptClusterIPs    = "KNIT-CLUSTER-IPS"
	iptReject        = "KNIT-REJECT"
	iptPrefixSvc     = "KNIT-SVC-"
	iptPrefixLocal   = "KNIT-SVL-"
	iptPrefixExt     = "KNIT-EXT-"
	iptPrefixFw      = "KNIT-FW-"
	iptPrefixSep     = "KNIT-SEP-"
	iptTableNAT      = "nat"
	iptTableFilter   = "filter"
	iptTableMangle   = "mangle"
	iptChainNameMax  = 28
	iptProbabilityFm = "%0.10f"
)

// iptServiceChain tells the per-Service chains (which full syncs delete
// when no Service renders them any more) from the fixed ones.
func iptServiceChain(name string) bool {
	for _, p := range []string{iptPrefixSvc, iptPrefixLocal, iptPrefixExt, iptPrefixFw, iptPrefixSep} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// iptSlot names a fixed chain that holds rules of many Services; a sync
// rewrites such a chain whole when any of its Services' rules changed.
type iptSlot int

const (
	slotNATServices iptSlot = iota
	slotNATNodePorts
	slotFilterServices
	slotFilterExternal
	slotFilterFirewall
	slotFilterClusterIPs
	numSlots
)

var iptSlots = [numSlots]struct{ table, chain string }{
	slotNATServices:      {iptTableNAT, iptServices},
	slotNATNodePorts:     {iptTableNAT, iptNodePorts},
	slotFilterServices:   {iptTableFilter, iptServices},
	slotFilterExternal:   {iptTableFilter, iptExternal},
	slotFilterFirewall:   {iptTableFilter, iptFirewall},
	slotFilterClusterIPs: {iptTableFilter, iptClusterIPs},
}

// iptChain is a chain of the nat table with its rules, each the text after
// "-A <chain> ".
type iptChain struct {
	name  string
	rules []string
}

// iptRender is what one Service contributes in one family: rules in the
// shared chains and chains of its own (all in the nat table).
type iptRender struct {
	shared  [numSlots][]string
	chains  []iptChain
	noLocal int
}

func (r *iptRender) equal(o *iptRender) bool {
	if r == nil || o == nil {
		return r == o
	}
	if r.noLocal != o.noLocal || !slices.EqualFunc(r.chains, o.chains, func(a, b iptChain) bool {
		return a.name == b.name && slices.Equal(a.rules, b.rules)
	}) {
		return false
	}
	for i := range r.shared {
		if !slices.Equal(r.shared[i], o.shared[i]) {
			return false
		}
	}
	return true
}

func (r *iptRender) rules() int {
	n := 0
	for i := range r.shared {
		n += len(r.shared[i])
	}
	for _, c := range r.chains {
		n += len(c.rules)
	}
	return n
}

// iptRenderer holds what every render of one sync needs.
type iptRenderer struct {
	mark         string // "0x4000/0x4000"
	clusterCIDRs map[family][]string
	topo         topology
	nodeIPs      []netip.Addr
}

func newIPTRenderer(st *state) *iptRenderer {
	r := &iptRenderer{
		mark:         st.static.masqMark + "/" + st.static.masqMark,
		clusterCIDRs: map[family][]string{},
		topo:         st.topo,
		nodeIPs:      st.static.nodeIPs,
	}
	for f, s := range st.static.clusterCIDRs {
		r.clusterCIDRs[f] = strings.Split(s, ", ")
	}
	return r
}

// iptHash is kube-proxy's chain-name hash: 16 base32 characters of sha256.
func iptHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(h[:])[:16]
}

func iptComment(text string) string { return `-m comment --comment "` + text + `"` }

// iptMatch is the protocol and port match: "-p tcp -m tcp --dport 80".
func iptMatch(proto string, port uint16) string {
	return "-p " + proto + " -m " + proto + " --dport " + strconv.Itoa(int(port))
}

// renderService renders the ports of one Service in family f; nil when the
// Service has none there.
func (r *iptRenderer) renderService(name types.NamespacedName, info *serviceInfo, eps portEndpoints, f family) *iptRender {
	var out *iptRender
	var cips []netip.Addr
	for i := range info.ports {
		sp := &info.ports[i]
		if sp.family != f || sp.nodeLocal {
			// nodeLocal: a process on this node answers this ClusterIP
			// itself (the node-local DNS): no DNAT, no reject.
			continue
		}
		if out == nil {
			out = &iptRender{}
		}
		r.renderPort(out, name, sp, eps.get(epKey{portKey: sp.portKey, family: f}))
		if !slices.Contains(cips, sp.clusterIP) {
			cips = append(cips, sp.clusterIP)
		}
	}
	for _, a := range cips {
		out.shared[slotFilterClusterIPs] = append(out.shared[slotFilterClusterIPs],
			iptComment(name.String()+" undefined port")+" -d "+a.String()+" -j "+iptReject)
	}
	return out
}

func (r *iptRenderer) renderPort(out *iptRender, svc types.NamespacedName, sp *servicePort, eps []endpoint) {
	f := sp.family
	portName := svc.Namespace + "/" + svc.Name + ":" + sp.name
	h := iptHash(portName + sp.proto)
	clusterChain := iptPrefixSvc + h
	localChain := iptPrefixLocal + h
	extChain := iptPrefixExt + h
	fwChain := iptPrefixFw + h
	sep := func(e *endpoint) string { return iptPrefixSep + iptHash(portName+sp.proto+e.hostPort()) }
	match := iptMatch(sp.proto, sp.port)

	es := categorize(eps, sp, r.topo)
	pl := planPort(sp, es)
	usesCluster, usesLocal, usesExternal := pl.usesCluster, pl.usesLocal, pl.usesExternal
	hasInternal, hasExternal := pl.hasInternal, pl.hasExternal
	internalChain, externalPolicyChain := pl.chains(clusterChain, localChain)
	usesFW := usesExternal && len(sp.lbIPs) > 0 && len(sp.sourceRanges) > 0
	lbChain := extChain
	if usesFW {
		lbChain = fwChain
	}

	intTarget, intComment := "", ""
	extTarget, extComment := "", ""
	if !es.any {
		intTarget, intComment = iptReject, portName+" has no endpoints"
		extTarget, extComment = intTarget, intComment
	} else {
		if !hasInternal {
			intTarget, intComment = "DROP", portName+" has no local endpoints"
		}
		if !hasExternal {
			extTarget, extComment = "DROP", portName+" has no local endpoints"
			out.noLocal++
		}
	}

	add := func(s iptSlot, rule string) { out.shared[s] = append(out.shared[s], rule) }
	cip := sp.clusterIP.String()
	if hasInternal {
		add(slotNATServices, iptComment(portName+" cluster IP")+" -d "+cip+" "+match+" -j "+internalChain)
	} else {
		add(slotFilterServices, iptComment(intComment)+" -d "+cip+" "+match+" -j "+intTarget)
	}
	for _, a := range sp.externalIPs {
		if usesExternal {
			add(slotNATServices, iptComment(portName+" external IP")+" -d "+a.String()+" "+match+" -j "+extChain)
		}
		if !hasExternal {
			add(slotFilterExternal, iptComment(extComment)+" -d "+a.String()+" "+match+" -j "+extTarget)
		}
	}
	for _, a := range sp.lbIPs {
		if usesExternal {
			add(slotNATServices, iptComment(portName+" loadbalancer IP")+" -d "+a.String()+" "+match+" -j "+lbChain)
		}
		if usesFW {
			add(slotFilterFirewall, iptComment(portName+" traffic not accepted by "+fwChain)+" -d "+a.String()+" "+match+" -j DROP")
		}
		if !hasExternal {
			add(slotFilterExternal, iptComment(extComment)+" -d "+a.String()+" "+match+" -j "+extTarget)
		}
	}
	if sp.nodePort != 0 {
		npMatch := iptMatch(sp.proto, sp.nodePort)
		if usesExternal {
			add(slotNATNodePorts, iptComment(portName)+" "+npMatch+" -j "+extChain)
		}
		if !hasExternal {
			add(slotFilterExternal, iptComment(extComment)+" -m addrtype --dst-type LOCAL "+npMatch+" -j "+extTarget)
		}
	}

	if usesExternal {
		ch := iptChain{name: extChain}
		switch {
		case !sp.extLocal:
			// Policy Cluster: the endpoint may be on another node, so the
			// reply must come back here to be un-DNATed.
			ch.rules = append(ch.rules, iptComment("masquerade traffic for "+portName+" external destinations")+" -j "+iptMarkMasq)
		case usesCluster:
			// Policy Local keeps the client address. Pods and the node
			// itself reaching an external address behave as if they went
			// out to the load balancer and came back: policy Cluster.
			for _, c := range r.clusterCIDRs[f] {
				ch.rules = append(ch.rules, iptComment("pod traffic for "+portName+" external destinations")+" -s "+c+" -j "+clusterChain)
			}
			ch.rules = append(ch.rules,
				iptComment("masquerade LOCAL traffic for "+portName+" external destinations")+" -m addrtype --src-type LOCAL -j "+iptMarkMasq,
				iptComment("route LOCAL traffic for "+portName+" external destinations")+" -m addrtype --src-type LOCAL -j "+clusterChain)
		}
		if hasExternal {
			ch.rules = append(ch.rules, "-j "+externalPolicyChain)
		}
		out.chains = append(out.chains, ch)
	}

	if usesFW {
		// loadBalancerSourceRanges: allowed sources go on; the rest falls
		// through un-DNATed and KNIT-PROXY-FIREWALL drops it. If the node
		// itself is in a range, the LB IPs are allowed as sources too: a
		// node reaching a VIP that it holds locally sends from the VIP.
		ch := iptChain{name: fwChain}
		nodeAllowed := false
		for _, p := range sp.sourceRanges {
			ch.rules = append(ch.rules, iptComment(portName+" loadbalancer IP")+" -s "+p.String()+" -j "+extChain)
			for _, a := range r.nodeIPs {
				nodeAllowed = nodeAllowed || p.Contains(a)
			}
		}
		if nodeAllowed {
			for _, a := range sp.lbIPs {
				ch.rules = append(ch.rules, iptComment(portName+" loadbalancer IP")+" -s "+a.String()+" -j "+extChain)
			}
		}
		out.chains = append(out.chains, ch)
	}

	// An endpoint gets a chain of its own (kube-proxy gives every endpoint
	// one) only when it needs one: a local endpoint may connect to its own
	// Service and be picked, and is then masqueraded (hairpin), and
	// affinity records the client per endpoint. Others are DNATed by the
	// policy chain's rule itself: at 10,000 Services x 10 remote endpoints
	// that is 10,000 chains and 130,000 rules instead of 110,000 and
	// 330,000, which iptables-nft-restore did not load within 2 minutes.
	// Only a local endpoint can be its own client: a Pod's Service traffic
	// is DNATed on its own node.
	ownChain := func(e *endpoint) bool { return e.local || sp.sticky > 0 }
	dnat := func(e *endpoint) string {
		return "-p " + sp.proto + " -m " + sp.proto + " -j DNAT --to-destination " + e.hostPort()
	}
	policy := func(name string, list []endpoint) iptChain {
		ch := iptChain{name: name}
		if hasInternal && name == internalChain && len(r.clusterCIDRs[f]) > 0 {
			// ClusterIP traffic from outside the cluster CIDRs (a node, or
			// a router sending the service CIDR here) is masqueraded: the
			// endpoint may be on another node.
			ch.rules = append(ch.rules, iptComment(portName+" cluster IP")+" -d "+cip+" "+match+" -j "+iptMarkOutside)
		}
		if sp.sticky > 0 {
			secs := strconv.Itoa(int(sp.sticky.Seconds()))
			for i := range list {
				e := &list[i]
				ch.rules = append(ch.rules, iptComment(portName+" -> "+e.hostPort())+
					" -m recent --name "+sep(e)+" --rcheck --seconds "+secs+" --reap -j "+sep(e))
			}
		}
		n := len(list)
		for i := range list {
			e := &list[i]
			rule := iptComment(portName + " -> " + e.hostPort())
			if i < n-1 {
				rule += " -m statistic --mode random --probability " + fmt.Sprintf(iptProbabilityFm, 1/float64(n-i))
			}
			if ownChain(e) {
				rule += " -j " + sep(e)
			} else {
				rule += " " + dnat(e)
			}
			ch.rules = append(ch.rules, rule)
		}
		return ch
	}
	if usesCluster {
		out.chains = append(out.chains, policy(clusterChain, es.cluster))
	}
	if usesLocal {
		out.chains = append(out.chains, policy(localChain, es.local))
	}
	for i := range es.reachable {
		e := &es.reachable[i]
		if !ownChain(e) {
			continue
		}
		ch := iptChain{name: sep(e)}
		if e.local {
			// An endpoint connecting to its own Service and picked:
			// masquerade so the reply comes back through us (hairpin).
			ch.rules = append(ch.rules, iptComment(portName)+" -s "+e.addr.String()+" -j "+iptMarkMasq)
		}
		last := iptComment(portName)
		if sp.sticky > 0 {
			last += " -m recent --name " + ch.name + " --set"
		}
		ch.rules = append(ch.rules, last+" "+dnat(e))
		out.chains = append(out.chains, ch)
	}
}

// iptStatic is the fixed part of one family's rules: whole chains, and the
// fixed rules before (head) and after (tail) the Services' rules in the
// shared chains.
type iptStatic struct {
	filterChains, natChains []iptChain
	head, tail              [numSlots][]string
}

// iptStaticRules renders the fixed rules of family f.
func iptStaticRules(c *staticConfig, f family, randomFully bool) *iptStatic {
	mark := c.masqMark + "/" + c.masqMark
	s := &iptStatic{}
	masq := iptComment("knit service traffic requiring SNAT") + " -j MASQUERADE"
	if randomFully {
		masq += " --random-fully"
	}
	s.natChains = []iptChain{
		{name: iptPostrouting, rules: []string{
			"-m mark ! --mark " + mark + " -j RETURN",
			// Clear the mark before masquerading: a packet leaving
			// through the VXLAN device is encapsulated with the inner
			// packet's mark, and an outer UDP packet still carrying it
			// would be NATed a second time (kubernetes #88986, #92035).
			"-j MARK --xor-mark " + c.masqMark,
			masq,
		}},
		{name: iptMarkMasq, rules: []string{"-j MARK --or-mark " + c.masqMark}},
	}
	if cidrs := c.clusterCIDRs[f]; cidrs != "" {
		ch := iptChain{name: iptMarkOutside}
		for _, p := range strings.Split(cidrs, ", ") {
			ch.rules = append(ch.rules, iptComment("inside the cluster")+" -s "+p+" -j RETURN")
		}
		ch.rules = append(ch.rules, iptComment("masquerade ClusterIP traffic from outside the cluster")+" -j "+iptMarkMasq)
		s.natChains = append(s.natChains, ch)
	}
	s.filterChains = []iptChain{{name: iptReject, rules: []string{
		"-p tcp -j REJECT --reject-with tcp-reset",
		"-j REJECT",
	}}}

	loopback := "127.0.0.0/8"
	if f == v6 {
		loopback = "::1/128"
	}
	npComment := iptComment("knit service nodeports; must be the last rule in this chain")
	if c.nodePortIPs == nil {
		s.tail[slotNATServices] = append(s.tail[slotNATServices], npComment+" -m addrtype --dst-type LOCAL ! -d "+loopback+" -j "+iptNodePorts)
	} else {
		for _, a := range c.nodePortIPs[f] {
			s.tail[slotNATServices] = append(s.tail[slotNATServices], npComment+" -d "+a.String()+" -j "+iptNodePorts)
		}
	}
	for _, a := range c.localServiceIPs[f] {
		s.head[slotFilterClusterIPs] = append(s.head[slotFilterClusterIPs], iptComment("answered on this node")+" -d "+a.String()+" -j RETURN")
	}
	if cidrs := c.serviceCIDRs[f]; cidrs != "" {
		for _, p := range strings.Split(cidrs, ", ") {
			s.tail[slotFilterServices] = append(s.tail[slotFilterServices], "-d "+p+" -j "+iptClusterIPs)
		}
		s.tail[slotFilterClusterIPs] = append(s.tail[slotFilterClusterIPs], iptComment("drop traffic to unallocated ClusterIPs")+" -j DROP")
	} else {
		s.tail[slotFilterServices] = append(s.tail[slotFilterServices], "-j "+iptClusterIPs)
	}
	return s
}

func (s *iptStatic) rules() int {
	n := 0
	for _, c := range append(slices.Clone(s.filterChains), s.natChains...) {
		n += len(c.rules)
	}
	for i := range s.head {
		n += len(s.head[i]) + len(s.tail[i])
	}
	return n
}

// iptJump is a rule in a built-in chain that sends packets to knit's
// chains. These are the only rules knit adds outside its own chains; they
// are inserted at the top once and never rewritten.
type iptJump struct {
	table, chain string
	args         []string
}

// iptJumps are in the order they should end up in each built-in chain.
var iptJumps = func() []iptJump {
	newOnly := []string{"-m", "conntrack", "--ctstate", "NEW"}
	j := func(table, chain string, extra []string, comment, target string) iptJump {
		args := append(slices.Clone(extra), "-m", "comment", "--comment", comment, "-j", target)
		return iptJump{table: table, chain: chain, args: args}
	}
	return []iptJump{
		j(iptTableFilter, "INPUT", newOnly, "knit load balancer firewall", iptFirewall),
		j(iptTableFilter, "INPUT", newOnly, "knit externally-visible service portals", iptExternal),
		j(iptTableFilter, "FORWARD", newOnly, "knit load balancer firewall", iptFirewall),
		j(iptTableFilter, "FORWARD", newOnly, "knit service portals", iptServices),
		j(iptTableFilter, "FORWARD", newOnly, "knit externally-visible service portals", iptExternal),
		j(iptTableFilter, "OUTPUT", newOnly, "knit load balancer firewall", iptFirewall),
		j(iptTableFilter, "OUTPUT", newOnly, "knit service portals", iptServices),
		j(iptTableFilter, "OUTPUT", newOnly, "knit externally-visible service portals", iptExternal),
		j(iptTableNAT, "PREROUTING", nil, "knit service portals", iptServices),
		j(iptTableNAT, "OUTPUT", nil, "knit service portals", iptServices),
		j(iptTableNAT, "POSTROUTING", nil, "knit postrouting rules", iptPostrouting),
	}
}()
