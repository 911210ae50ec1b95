package proxy

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/knftables"
)

// Names in the knit-proxy table. Containers that hold addresses exist once
// per family (suffix -v4/-v6) because an nft set has one key type; the
// base chains and helper chains are shared by both families.
const (
	tableName = "knit-proxy"

	chainNatPrerouting  = "nat-prerouting"
	chainNatOutput      = "nat-output"
	chainNatPostrouting = "nat-postrouting"
	chainFilterInput    = "filter-input"
	chainFilterForward  = "filter-forward"
	chainFilterOutput   = "filter-output"
	chainFilterPreDNAT  = "filter-prerouting-pre-dnat"
	chainFilterOutPre   = "filter-output-pre-dnat"
	chainFirewallCheck  = "firewall-check"
	mapFirewallIPs      = "firewall-ips"
	prefixFirewall      = "firewall-"

	chainServices         = "services"
	chainMasquerading     = "masquerading"
	chainServiceEPCheck   = "service-endpoints-check"
	chainNodePortEPCheck  = "nodeport-endpoints-check"
	chainClusterIPsCheck  = "cluster-ips-check"
	chainReject           = "reject-chain"
	mapServiceIPs         = "service-ips"
	mapServiceNodePorts   = "service-nodeports"
	mapNoEPServices       = "no-endpoint-services"
	mapNoEPNodePorts      = "no-endpoint-nodeports"
	setClusterIPs         = "cluster-ips"
	setNodePortIPs        = "nodeport-ips"
	setHairpin            = "hairpin-connections"
	setLocalServiceIPs    = "local-service-ips"
	setClusterCIDRs       = "cluster-cidrs"
	mapEndpoints          = "endpoints"
	prefixPick            = "pick-"
	suffixEndpoints       = "/endpoints"
	prefixCluster         = "service-"
	prefixLocal           = "local-"
	prefixExternal        = "external-"
	prefixEndpoint        = "endpoint-"
	prefixAffinity        = "affinity-"
	commentMasquerade     = "masquerade"
	commentShortCircuitPd = "short-circuit pod traffic"
)

// perFamily names a container of one family: "service-ips-v4". The names
// of the fixed containers are built once: every element holds its
// container's name.
func perFamily(name string, f family) string {
	if n, ok := familyNames[name]; ok {
		return n[f.index()]
	}
	return name + "-" + f.String()
}

// familyNames holds the per-family names of the fixed containers, and of
// the shared endpoints maps ("endpoints-v4-tcp", by "endpoints-tcp").
var familyNames = func() map[string][2]string {
	m := map[string][2]string{}
	for _, n := range []string{mapServiceIPs, mapServiceNodePorts, mapNoEPServices, mapNoEPNodePorts, mapFirewallIPs,
		setClusterIPs, setNodePortIPs, setHairpin, setLocalServiceIPs, setClusterCIDRs, mapEndpoints} {
		m[n] = [2]string{n + "-v4", n + "-v6"}
	}
	for _, p := range l4protos {
		m[mapEndpoints+"-"+p] = [2]string{mapEndpoints + "-v4-" + p, mapEndpoints + "-v6-" + p}
	}
	return m
}()

// baseChains are hooked into netfilter; see the package doc for the flow.
var baseChains = []struct {
	name     string
	typ      knftables.BaseChainType
	hook     knftables.BaseChainHook
	priority knftables.BaseChainPriority
	rules    []string
}{
	// loadBalancerSourceRanges are checked before DNAT changes the
	// destination.
	{chainFilterPreDNAT, knftables.FilterType, knftables.PreroutingHook, knftables.DNATPriority + "-10",
		[]string{"ct state new jump " + chainFirewallCheck}},
	{chainFilterOutPre, knftables.FilterType, knftables.OutputHook, knftables.DNATPriority + "-10",
		[]string{"ct state new jump " + chainFirewallCheck}},
	{chainFilterInput, knftables.FilterType, knftables.InputHook, knftables.FilterPriority,
		[]string{"ct state new jump " + chainNodePortEPCheck, "ct state new jump " + chainServiceEPCheck}},
	{chainFilterForward, knftables.FilterType, knftables.ForwardHook, knftables.FilterPriority,
		[]string{"ct state new jump " + chainServiceEPCheck, "ct state new jump " + chainClusterIPsCheck}},
	{chainFilterOutput, knftables.FilterType, knftables.OutputHook, knftables.FilterPriority,
		[]string{"ct state new jump " + chainServiceEPCheck, "ct state new jump " + chainClusterIPsCheck}},
	{chainNatPrerouting, knftables.NATType, knftables.PreroutingHook, knftables.DNATPriority,
		[]string{"jump " + chainServices}},
	{chainNatOutput, knftables.NATType, knftables.OutputHook, knftables.DNATPriority,
		[]string{"jump " + chainServices}},
	{chainNatPostrouting, knftables.NATType, knftables.PostroutingHook, knftables.SNATPriority,
		[]string{"jump " + chainMasquerading}},
}

// element is one set or map element a render asks for. The backend keeps
// every element of every Service (100,000 and more at 10,000 Services), so
// it is kept small: the key is one string, its parts joined as nft writes a
// concatenation, and container names are shared (see perFamily).
type element struct {
	container string
	key       string // "10.43.0.1 . tcp . 80"
	value     string // verdict for maps, "" for sets
	comment   string
}

// keySep joins the parts of a concatenated key; no part contains it.
const keySep = " . "

// joinKey joins the parts of a concatenated key.
func joinKey(parts ...string) string { return strings.Join(parts, keySep) }

// elemID identifies an element in the table: its container and key.
type elemID struct{ container, key string }

func (e *element) id() elemID { return elemID{e.container, e.key} }

func (id elemID) String() string { return id.container + " " + id.key }

// compareIDs orders elements by container, then key (as their String does).
func compareIDs(a, b elemID) int {
	if c := strings.Compare(a.container, b.container); c != 0 {
		return c
	}
	return strings.Compare(a.key, b.key)
}

func (e *element) object() *knftables.Element {
	o := &knftables.Element{Key: strings.Split(e.key, keySep)}
	if e.value == "" {
		o.Set = e.container
	} else {
		o.Map = e.container
		o.Value = []string{e.value}
	}
	if e.comment != "" {
		c := e.comment
		o.Comment = &c
	}
	return o
}

type chain struct {
	name  string
	rules []rule
}

type rule struct {
	text    string
	comment string
}

type affinitySet struct {
	name    string
	family  family
	timeout time.Duration
}

func (a *affinitySet) object() *knftables.Set {
	t := a.timeout
	return &knftables.Set{
		Name:    a.name,
		Type:    a.family.addrType(),
		Flags:   []knftables.SetFlag{knftables.DynamicFlag, knftables.TimeoutFlag},
		Timeout: &t,
	}
}

// svcRender is everything one Service contributes to the table: its own
// chains and affinity sets, and its elements in the shared maps and sets.
type svcRender struct {
	name     types.NamespacedName
	chains   []chain
	sets     []affinitySet
	elements []element
	// maps are the Service's endpoint maps (numgen index -> endpoint).
	maps []epMap
	// picks are the shared chains the Service's ClusterIP-only ports
	// choose their endpoint with (see pick); a port may repeat one.
	picks []pickChain
	// noLocal counts ports that drop external traffic for lack of a local
	// endpoint (metrics only).
	noLocal int
}

// epMap is a policy chain's map from a numgen index to an endpoint
// (address . port), or with affinity to an endpoint chain (verdict).
type epMap struct {
	name    string
	family  family
	proto   string
	verdict bool
}

func (m *epMap) object() *knftables.Map {
	// The data's port is the Service's protocol's: nft refuses a rule
	// whose protocol differs from the one in the map's typeof once the map
	// is in the kernel ("conflicting protocols specified: udp vs. tcp").
	typ := "numgen random mod 1 : " + m.family.ipX() + " daddr . " + m.proto + " dport"
	if m.verdict {
		typ = "numgen random mod 1 : verdict"
	}
	return &knftables.Map{Name: m.name, TypeOf: typ}
}

// pickChain is the chain that every port reached only through its ClusterIP
// with n endpoints of one protocol and family shares (see renderer.pick).
type pickChain struct {
	family family
	proto  string
	n      int
}

func (p pickChain) name() string {
	return prefixPick + p.family.String() + "-" + p.proto + "-" + strconv.Itoa(p.n)
}

// chain: the endpoint is the element of endpoints-vX at (ClusterIP,
// protocol, port, random index).
func (p pickChain) chain() chain {
	ipX := p.family.ipX()
	return chain{name: p.name(), rules: []rule{{text: "meta l4proto " + p.proto + " dnat " + ipX + " addr . port to " +
		ipX + " daddr . " + p.proto + " dport . numgen random mod " + strconv.Itoa(p.n) + " map @" + endpointsMap(p.family, p.proto)}}}
}

// endpointsMap names the shared endpoints map of a family and protocol:
// "endpoints-v4-tcp". One per protocol because nft (1.0.6) refuses a rule
// whose protocol differs from the one in the typeof of a map's data.
func endpointsMap(f family, proto string) string {
	if n, ok := familyNames[mapEndpoints+"-"+proto]; ok {
		return n[f.index()]
	}
	return perFamily(mapEndpoints, f) + "-" + proto
}

// l4protos are the protocols a Service port may have, as nft names them.
var l4protos = []string{"tcp", "udp", "sctp"}

// isPickChain tells the shared pick chains from the fixed chains.
func isPickChain(name string) bool { return strings.HasPrefix(name, prefixPick) }

// renderer holds what every render needs besides the Service itself.
type renderer struct {
	masqMark     string // "0x4000"
	clusterCIDRs map[family]string
	topo         topology
	nodeIPs      []netip.Addr
}

func (r *renderer) masqRule() string { return "mark set mark or " + r.masqMark }

// chainBase is "namespace/name/protocol/port" ("_" for an unnamed port):
// readable, and unique because Kubernetes names never contain "/" or "_".
func chainBase(svc types.NamespacedName, sp *servicePort) string {
	port := sp.name
	if port == "" {
		port = "_"
	}
	return svc.Namespace + "/" + svc.Name + "/" + sp.proto + "/" + port
}

// chainName builds a chain or set name, hashing only when the readable one
// would exceed nft's limit (it cannot with Kubernetes' own name limits).
func chainName(prefix string, f family, base string) string {
	return limitName(prefix + f.String() + "-" + base)
}

func limitName(n string) string {
	if len(n) <= knftables.NameLengthMax {
		return n
	}
	h := sha256.Sum256([]byte(n))
	hash := base32.StdEncoding.EncodeToString(h[:])[:8]
	return n[:knftables.NameLengthMax-12] + "..." + hash
}

func endpointBase(base string, e *endpoint) string {
	return base + "__" + strings.ReplaceAll(e.addr.String(), ":", ".") + "/" + strconv.Itoa(int(e.port))
}

// isServiceObject tells the table's per-Service chains and sets (all named
// with "/") from the fixed ones.
func isServiceObject(name string) bool { return strings.Contains(name, "/") }

// renderService renders all ports of one Service. The logic follows
// kube-proxy's nftables proxier; see the package doc for the chains.
func (r *renderer) renderService(name types.NamespacedName, info *serviceInfo, eps portEndpoints) *svcRender {
	out := &svcRender{name: name}
	for i := range info.ports {
		sp := &info.ports[i]
		if sp.nodeLocal {
			// A process on this node answers this ClusterIP itself (the
			// node-local DNS): no DNAT, no reject, not in cluster-ips.
			continue
		}
		r.renderPort(out, name, sp, eps.get(epKey{portKey: sp.portKey, family: sp.family}))
	}
	// The backend keeps the elements as long as the Service is unchanged:
	// without append's spare capacity.
	if cap(out.elements) > len(out.elements) {
		out.elements = slices.Clone(out.elements)
	}
	return out
}

func (r *renderer) renderPort(out *svcRender, svc types.NamespacedName, sp *servicePort, eps []endpoint) {
	f := sp.family
	ipX := f.ipX()
	proto := sp.proto
	port := strconv.Itoa(int(sp.port))
	base := chainBase(svc, sp)
	comment := svc.Namespace + "/" + svc.Name + ":" + sp.name
	clusterChain := chainName(prefixCluster, f, base)
	localChain := chainName(prefixLocal, f, base)
	externalChain := chainName(prefixExternal, f, base)

	es := categorize(eps, sp, r.topo)
	affinity := sp.sticky > 0

	for i := range es.reachable {
		e := &es.reachable[i]
		if e.local {
			// A local endpoint may connect to its own Service and be picked:
			// masquerade so the reply comes back through us (hairpin).
			a := e.addr.String()
			out.elements = append(out.elements, element{
				container: perFamily(setHairpin, f),
				key:       joinKey(a, a, proto, strconv.Itoa(int(e.port))),
			})
		}
	}

	pl := planPort(sp, es)
	usesCluster, usesLocal, usesExternal := pl.usesCluster, pl.usesLocal, pl.usesExternal
	hasInternal, hasExternal := pl.hasInternal, pl.hasExternal
	internalChain, externalPolicyChain := pl.chains(clusterChain, localChain)
	// A port reached only through its ClusterIP, without affinity, needs
	// no chain of its own: it picks from the shared endpoints map.
	shared := !affinity && !sp.externallyAccessible()
	if shared && hasInternal {
		list := es.cluster
		if sp.intLocal {
			list = es.local
		}
		internalChain = r.pick(out, sp, list)
	}

	var intVerdict, extVerdict string
	if !es.any {
		intVerdict, extVerdict = "goto "+chainReject, "goto "+chainReject
	} else {
		if !hasInternal {
			intVerdict = "drop"
		}
		if !hasExternal {
			extVerdict = "drop"
			out.noLocal++
		}
	}

	cip := sp.clusterIP.String()
	cipKey := joinKey(cip, proto, port)
	out.elements = append(out.elements, element{container: perFamily(setClusterIPs, f), key: cip})
	if hasInternal {
		out.elements = append(out.elements, element{
			container: perFamily(mapServiceIPs, f), key: cipKey, value: "goto " + internalChain,
		})
	} else {
		out.elements = append(out.elements, element{
			container: perFamily(mapNoEPServices, f), key: cipKey, value: intVerdict, comment: comment,
		})
	}
	for _, list := range [][]netip.Addr{sp.externalIPs, sp.lbIPs} {
		for _, a := range list {
			k := joinKey(a.String(), proto, port)
			if usesExternal {
				out.elements = append(out.elements, element{
					container: perFamily(mapServiceIPs, f), key: k, value: "goto " + externalChain,
				})
			}
			if !hasExternal {
				out.elements = append(out.elements, element{
					container: perFamily(mapNoEPServices, f), key: k, value: extVerdict, comment: comment,
				})
			}
		}
	}
	if sp.nodePort != 0 {
		k := joinKey(proto, strconv.Itoa(int(sp.nodePort)))
		if usesExternal {
			out.elements = append(out.elements, element{
				container: perFamily(mapServiceNodePorts, f), key: k, value: "goto " + externalChain,
			})
		}
		if !hasExternal {
			out.elements = append(out.elements, element{
				container: perFamily(mapNoEPNodePorts, f), key: k, value: extVerdict, comment: comment,
			})
		}
	}

	if len(sp.lbIPs) > 0 && len(sp.sourceRanges) > 0 {
		// loadBalancerSourceRanges: traffic to the LB IPs from elsewhere is
		// dropped before DNAT. If the node itself is in a range, the LB IPs
		// are allowed as sources too: a node reaching a VIP that it holds
		// locally sends from the VIP.
		fw := chainName(prefixFirewall, f, base)
		var allowed []string
		nodeAllowed := false
		for _, p := range sp.sourceRanges {
			allowed = append(allowed, p.String())
			for _, a := range r.nodeIPs {
				nodeAllowed = nodeAllowed || p.Contains(a)
			}
		}
		if nodeAllowed {
			for _, a := range sp.lbIPs {
				allowed = append(allowed, a.String())
			}
		}
		out.chains = append(out.chains, chain{name: fw, rules: []rule{{text: ipX + " saddr != { " + strings.Join(allowed, ", ") + " } drop"}}})
		for _, a := range sp.lbIPs {
			out.elements = append(out.elements, element{
				container: perFamily(mapFirewallIPs, f), key: joinKey(a.String(), proto, port), value: "goto " + fw,
			})
		}
	}

	if usesExternal {
		ch := chain{name: externalChain}
		if !sp.extLocal {
			// Policy Cluster: the endpoint may be on another node, so the
			// reply must come back here to be un-DNATed.
			ch.rules = append(ch.rules, rule{text: r.masqRule(), comment: commentMasquerade})
		} else if usesCluster {
			// Policy Local keeps the client address. Pods and the node
			// itself reaching an external address behave as if they went
			// out to the load balancer and came back: policy Cluster.
			if r.clusterCIDRs[f] != "" {
				ch.rules = append(ch.rules, rule{
					text: ipX + " saddr @" + perFamily(setClusterCIDRs, f) + " goto " + clusterChain, comment: commentShortCircuitPd,
				})
			}
			ch.rules = append(ch.rules,
				rule{text: "fib saddr type local " + r.masqRule(), comment: "masquerade local traffic"},
				rule{text: "fib saddr type local goto " + clusterChain, comment: "short-circuit local traffic"},
			)
		}
		if hasExternal {
			ch.rules = append(ch.rules, rule{text: "goto " + externalPolicyChain})
		}
		out.chains = append(out.chains, ch)
	}

	if affinity {
		for i := range es.reachable {
			e := &es.reachable[i]
			eb := endpointBase(base, e)
			set := chainName(prefixAffinity, f, eb)
			out.sets = append(out.sets, affinitySet{name: set, family: f, timeout: sp.sticky})
			out.chains = append(out.chains, chain{name: chainName(prefixEndpoint, f, eb), rules: []rule{
				{text: "update @" + set + " { " + ipX + " saddr }"},
				{text: "meta l4proto " + proto + " dnat " + ipX + " to " + e.hostPort()},
			}})
		}
	}
	if usesCluster && !shared {
		out.chains = append(out.chains, r.policyChain(out, clusterChain, base, sp, es.cluster))
	}
	if usesLocal && !shared {
		out.chains = append(out.chains, r.policyChain(out, localChain, base, sp, es.local))
	}
}

// pick chooses among eps for a port reached only through its ClusterIP
// (no NodePort, external or LoadBalancer IP) and without affinity: the
// commonest Service by far. It renders no chain and no rule: the Service's
// endpoints are elements of one shared map, keyed on (ClusterIP,
// port, index) in endpoints-vX-<protocol>, and its service-ips element goes
// to the chain that all such ports with as many endpoints share:
//
//	pick-v4-tcp-3: meta l4proto tcp dnat ip addr . port to
//	    ip daddr . tcp dport . numgen random mod 3 map @endpoints-v4-tcp
//
// So adding or changing such a Service is a few map elements, and the
// table holds a few dozen chains however many Services there are: nft
// loads every chain of the table before it applies anything, and the
// kernel checks every chain reachable from a changed one, so chains are
// what makes a table slow to change. Only a handful of rules use the
// shared map (one per pick chain), which keeps adding its elements cheap:
// the kernel checks each new element against every rule that uses it.
func (r *renderer) pick(out *svcRender, sp *servicePort, eps []endpoint) string {
	pc := pickChain{family: sp.family, proto: sp.proto, n: len(eps)}
	out.picks = append(out.picks, pc)
	cipPort := sp.clusterIP.String() + keySep + strconv.Itoa(int(sp.port)) + keySep
	m := endpointsMap(sp.family, sp.proto)
	for i := range eps {
		out.elements = append(out.elements, element{
			container: m,
			key:       cipPort + strconv.Itoa(i),
			value:     eps[i].addr.String() + keySep + strconv.Itoa(int(eps[i].port)),
		})
	}
	return pc.name()
}

// inlineEndpointsMax: up to this many endpoints a policy chain chooses with
// one rule per endpoint; above, with a map of its own.
const inlineEndpointsMax = 32

// policyChain picks one of eps at random and DNATs to it, or with ClientIP
// affinity first sends clients seen recently to their endpoint.
//
// Up to inlineEndpointsMax endpoints, rule i matches with probability
// 1/(n-i) ("numgen random mod n-i 0"), which makes the choice uniform: the
// first packet of a connection costs at most that many rule evaluations,
// whatever the number of Services. Larger endpoint sets use a named map
// "<chain>/endpoints" (numgen index -> endpoint): one lookup.
//
// Never one anonymous map per Service in the rule (kube-proxy's shape), nor
// one map shared by a rule in every Service's chain (the pick chains share
// one map between a few rules): the kernel resolves sets created in the same
// transaction by walking the transaction (40 s of system time for 10,000
// Services here), finds named sets by walking the table's set list, and
// validates every element of a map against every rule that uses it, all
// quadratic at 10,000 Services.
func (r *renderer) policyChain(out *svcRender, name, base string, sp *servicePort, eps []endpoint) chain {
	f := sp.family
	ipX := f.ipX()
	ch := chain{name: name}
	n := len(eps)
	// target is the final statement for endpoint i.
	target := func(i int) string {
		if sp.sticky > 0 {
			return "goto " + chainName(prefixEndpoint, f, endpointBase(base, &eps[i]))
		}
		return "meta l4proto " + sp.proto + " dnat " + ipX + " to " + eps[i].hostPort()
	}
	if sp.sticky > 0 {
		for i := range eps {
			eb := endpointBase(base, &eps[i])
			ch.rules = append(ch.rules, rule{
				text: ipX + " saddr @" + chainName(prefixAffinity, f, eb) + " goto " + chainName(prefixEndpoint, f, eb),
			})
		}
	}
	if n <= inlineEndpointsMax {
		for i := range n - 1 {
			ch.rules = append(ch.rules, rule{text: fmt.Sprintf("numgen random mod %d 0 %s", n-i, target(i))})
		}
		ch.rules = append(ch.rules, rule{text: target(n - 1)})
		return ch
	}
	m := epMap{name: limitName(name + suffixEndpoints), family: f, proto: sp.proto, verdict: sp.sticky > 0}
	out.maps = append(out.maps, m)
	pick := fmt.Sprintf("numgen random mod %d", n)
	for i := range eps {
		el := element{container: m.name, key: strconv.Itoa(i)}
		if m.verdict {
			el.value = target(i)
		} else {
			el.value = eps[i].addr.String() + keySep + strconv.Itoa(int(eps[i].port))
		}
		out.elements = append(out.elements, el)
	}
	if m.verdict {
		ch.rules = append(ch.rules, rule{text: pick + " vmap @" + m.name})
	} else {
		ch.rules = append(ch.rules, rule{text: "meta l4proto " + sp.proto + " dnat " + ipX + " addr . port to " + pick + " map @" + m.name})
	}
	return ch
}

// staticConfig is what the fixed part of the table depends on.
type staticConfig struct {
	masqMark     string
	clusterCIDRs map[family]string
	serviceCIDRs map[family]string
	// nodePortIPs: nil means every local address accepts NodePorts.
	nodePortIPs     map[family][]netip.Addr
	localServiceIPs map[family][]netip.Addr
	// nodeIPs: this node's addresses (loadBalancerSourceRanges).
	nodeIPs []netip.Addr
}

// staticSets returns the fixed sets and maps of the table.
func staticSets() (sets []*knftables.Set, maps []*knftables.Map) {
	for _, f := range []family{v4, v6} {
		a := f.addrType()
		maps = append(maps,
			&knftables.Map{Name: perFamily(mapServiceIPs, f), Type: a + " . inet_proto . inet_service : verdict",
				Comment: knftables.PtrTo("ClusterIP, ExternalIP and LoadBalancer IP traffic")},
			&knftables.Map{Name: perFamily(mapServiceNodePorts, f), Type: "inet_proto . inet_service : verdict",
				Comment: knftables.PtrTo("NodePort traffic")},
			&knftables.Map{Name: perFamily(mapNoEPServices, f), Type: a + " . inet_proto . inet_service : verdict",
				Comment: knftables.PtrTo("Service addresses without usable endpoints: reject or drop")},
			&knftables.Map{Name: perFamily(mapNoEPNodePorts, f), Type: "inet_proto . inet_service : verdict",
				Comment: knftables.PtrTo("NodePorts without usable endpoints: reject or drop")},
			&knftables.Map{Name: perFamily(mapFirewallIPs, f), Type: a + " . inet_proto . inet_service : verdict",
				Comment: knftables.PtrTo("LoadBalancer IPs subject to loadBalancerSourceRanges")},
		)
		for _, p := range l4protos {
			maps = append(maps, &knftables.Map{Name: endpointsMap(f, p),
				TypeOf:  f.ipX() + " daddr . " + p + " dport . numgen random mod 1 : " + f.ipX() + " daddr . " + p + " dport",
				Comment: knftables.PtrTo("endpoints of ClusterIP-only " + p + " ports: (ClusterIP, port, index) -> endpoint")})
		}
		sets = append(sets,
			&knftables.Set{Name: perFamily(setClusterIPs, f), Type: a, Comment: knftables.PtrTo("active ClusterIPs")},
			&knftables.Set{Name: perFamily(setNodePortIPs, f), Type: a, Comment: knftables.PtrTo("node addresses that accept NodePorts")},
			&knftables.Set{Name: perFamily(setHairpin, f), Type: a + " . " + a + " . inet_proto . inet_service",
				Comment: knftables.PtrTo("local endpoints: a connection to itself through its Service")},
			&knftables.Set{Name: perFamily(setLocalServiceIPs, f), Type: a,
				Comment: knftables.PtrTo("Service IPs answered by a process on this node")},
			&knftables.Set{Name: perFamily(setClusterCIDRs, f), Type: a, Flags: []knftables.SetFlag{knftables.IntervalFlag},
				Comment: knftables.PtrTo("Pod CIDRs: traffic from inside the cluster")},
		)
	}
	return sets, maps
}

// staticChains renders the fixed regular chains (base chains are in
// baseChains) and the fixed elements.
func staticChains(c *staticConfig) ([]chain, []element) {
	masq := "mark set mark or " + c.masqMark
	services := chain{name: chainServices}
	masquerading := chain{name: chainMasquerading, rules: []rule{{
		// Clear the mark before masquerading: a packet leaving through the
		// VXLAN device is encapsulated with the inner packet's mark, and
		// an outer UDP packet still carrying the mark would be NATed a
		// second time (kubernetes #88986, fixed by #92035).
		text: "mark and " + c.masqMark + " != 0 mark set mark xor " + c.masqMark + " masquerade fully-random",
	}}}
	svcCheck := chain{name: chainServiceEPCheck}
	npCheck := chain{name: chainNodePortEPCheck}
	cipCheck := chain{name: chainClusterIPsCheck}
	fwCheck := chain{name: chainFirewallCheck}
	reject := chain{name: chainReject, rules: []rule{
		{text: "meta l4proto tcp reject with tcp reset"},
		{text: "reject"},
	}}
	var elems []element
	for _, f := range []family{v4, v6} {
		ipX := f.ipX()
		loopback := "127.0.0.0/8"
		if f == v6 {
			loopback = "::1"
		}
		if cidrs := c.clusterCIDRs[f]; cidrs != "" {
			services.rules = append(services.rules, rule{
				text:    ipX + " daddr @" + perFamily(setClusterIPs, f) + " " + ipX + " saddr != @" + perFamily(setClusterCIDRs, f) + " " + masq,
				comment: "masquerade ClusterIP traffic from outside the cluster",
			})
			for _, p := range strings.Split(cidrs, ", ") {
				elems = append(elems, element{container: perFamily(setClusterCIDRs, f), key: p})
			}
		}
		services.rules = append(services.rules, rule{
			text: ipX + " daddr . meta l4proto . th dport vmap @" + perFamily(mapServiceIPs, f),
		})
		if c.nodePortIPs == nil {
			services.rules = append(services.rules, rule{
				text: "fib daddr type local " + ipX + " daddr != " + loopback + " meta l4proto . th dport vmap @" + perFamily(mapServiceNodePorts, f),
			})
			npCheck.rules = append(npCheck.rules, rule{
				text: ipX + " daddr != " + loopback + " meta l4proto . th dport vmap @" + perFamily(mapNoEPNodePorts, f),
			})
		} else {
			services.rules = append(services.rules, rule{
				text: ipX + " daddr @" + perFamily(setNodePortIPs, f) + " meta l4proto . th dport vmap @" + perFamily(mapServiceNodePorts, f),
			})
			npCheck.rules = append(npCheck.rules, rule{
				text: ipX + " daddr @" + perFamily(setNodePortIPs, f) + " meta l4proto . th dport vmap @" + perFamily(mapNoEPNodePorts, f),
			})
			for _, a := range c.nodePortIPs[f] {
				elems = append(elems, element{container: perFamily(setNodePortIPs, f), key: a.String()})
			}
		}
		masquerading.rules = append(masquerading.rules, rule{
			text: "ct status dnat " + ipX + " saddr . " + ipX + " daddr . meta l4proto . th dport @" + perFamily(setHairpin, f) + " masquerade fully-random",
		})
		fwCheck.rules = append(fwCheck.rules, rule{
			text: ipX + " daddr . meta l4proto . th dport vmap @" + perFamily(mapFirewallIPs, f),
		})
		svcCheck.rules = append(svcCheck.rules, rule{
			text: ipX + " daddr . meta l4proto . th dport vmap @" + perFamily(mapNoEPServices, f),
		})
		cipCheck.rules = append(cipCheck.rules,
			rule{text: ipX + " daddr @" + perFamily(setLocalServiceIPs, f) + " return", comment: "answered on this node"},
			rule{text: ipX + " daddr @" + perFamily(setClusterIPs, f) + " goto " + chainReject, comment: "reject traffic to undefined ports of ClusterIPs"},
		)
		if cidrs := c.serviceCIDRs[f]; cidrs != "" {
			cipCheck.rules = append(cipCheck.rules, rule{
				text: ipX + " daddr { " + cidrs + " } drop", comment: "drop traffic to unallocated ClusterIPs",
			})
		}
		for _, a := range c.localServiceIPs[f] {
			elems = append(elems, element{container: perFamily(setLocalServiceIPs, f), key: a.String()})
		}
	}
	return []chain{services, masquerading, svcCheck, npCheck, cipCheck, fwCheck, reject}, elems
}
