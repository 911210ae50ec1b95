package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	mdns "github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/proxy"
)

// Tables reads the proxy's nftables table.
type Tables interface {
	// Elements lists a map's elements; a missing map is an error.
	Elements(ctx context.Context, mapName string) ([]*knftables.Element, error)
	// ChainRules lists a chain's rules as nft prints them; found is false
	// when the chain does not exist.
	ChainRules(ctx context.Context, chain string) (rules []string, found bool, err error)
}

// Net reads the node's routes and links and sends probes.
type Net interface {
	// Route says how the node reaches ip: the knit route (proto 75) that
	// covers it, its neighbour and FDB entries, or where the kernel sends
	// it instead.
	Route(ip netip.Addr) RouteCheck
	// Links are the MTUs of the underlay, VXLAN and bridge devices.
	Links() ([]Link, error)
	// RouteMTU is the MTU of the device the kernel routes ip through.
	RouteMTU(ip netip.Addr) (int, error)
	// ProbeMTU sends one datagram of size bytes (IP packet) with Don't
	// Fragment to ip and reports whether anything came back.
	ProbeMTU(ctx context.Context, ip netip.Addr, size int) (bool, error)
}

// Inspector is the node side of `knit doctor`: the agent runs one and
// serves its reports. It reads the agent's cache, never the API server.
type Inspector struct {
	Node     string
	Domain   string       // cluster domain, "cluster.local"
	DNS      []netip.Addr // the cluster DNS addresses, answered on this node
	Bridge   string       // the pod bridge, "cni0"
	Services corelisters.ServiceLister
	Slices   discoverylisters.EndpointSliceLister
	Synced   func() bool

	Tables Tables
	// ProxyBackend names the proxy's backend; rules are inspected only
	// when it is nftables. Nil: nftables.
	ProxyBackend func() string
	Net          Net
	// Dial and Query are replaced in tests.
	Dial  func(ctx context.Context, network, addr string) (net.Conn, error)
	Query func(ctx context.Context, server, name string, qtype uint16) (*mdns.Msg, error)
}

// ServeHTTP answers GET .../{namespace}/{name}[?probe=1].
func (in *Inspector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ns, name := r.PathValue("namespace"), r.PathValue("name")
	if ns == "" || name == "" {
		http.Error(w, "want /debug/service/{namespace}/{name}", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	rep := in.Inspect(ctx, ns, name, r.URL.Query().Get("probe") != "")
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(rep)
}

// Inspect gathers the node's facts about one Service. With probe it also
// connects to the ClusterIP and every ready endpoint, and sends MTU probes.
func (in *Inspector) Inspect(ctx context.Context, namespace, name string, probe bool) *NodeReport {
	rep := &NodeReport{Node: in.Node, Time: time.Now()}
	rep.Cache.Synced = in.Synced == nil || in.Synced()
	if in.Services == nil {
		rep.Errors = append(rep.Errors, "this agent runs without a Service cache (neither proxy nor dns enabled)")
		return rep
	}
	svc, err := in.Services.Services(namespace).Get(name)
	if err != nil && !apierrors.IsNotFound(err) {
		rep.Errors = append(rep.Errors, "cache: "+err.Error())
	}
	rep.DNS = in.resolve(ctx, namespace, name, svc)
	if svc == nil {
		return rep
	}
	rep.Cache.Found = true
	rep.Cache.ClusterIPs = clusterIPs(svc)
	slicesOf, err := in.Slices.EndpointSlices(namespace).List(labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name}))
	if err != nil {
		rep.Errors = append(rep.Errors, "cache: "+err.Error())
	}
	rep.Cache.Endpoints = endpointsOf(slicesOf)

	switch {
	case in.ProxyBackend != nil && !strings.HasPrefix(in.ProxyBackend(), "nftables"):
		rep.RulesNote = "the proxy uses the " + in.ProxyBackend() + " backend; doctor reads only nftables rules"
	case in.Tables != nil:
		rep.Ports = in.rules(ctx, svc, rep)
	}
	if in.Net != nil {
		rep.Links, err = in.Net.Links()
		if err != nil {
			rep.Errors = append(rep.Errors, "links: "+err.Error())
		}
		seen := map[string]bool{}
		for _, e := range rep.Cache.Endpoints {
			ip, err := netip.ParseAddr(e.IP)
			if err != nil || !e.Ready || seen[e.IP] {
				continue
			}
			seen[e.IP] = true
			rc := in.Net.Route(ip)
			rc.IP, rc.Node, rc.Local = e.IP, e.Node, e.Node == in.Node
			rep.Routes = append(rep.Routes, rc)
		}
	}
	if probe {
		rep.Probes = in.probes(ctx, svc, rep.Cache.Endpoints)
		if in.Net != nil {
			rep.MTU = in.mtuProbes(ctx, rep.Cache.Endpoints)
		}
	}
	return rep
}

func clusterIPs(svc *corev1.Service) []string {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	return ips
}

// endpointsOf flattens slices into one entry per address, sorted.
func endpointsOf(slices []*discoveryv1.EndpointSlice) []Endpoint {
	var out []Endpoint
	for _, s := range slices {
		ports := map[string]int{}
		for _, p := range s.Ports {
			if p.Port != nil {
				n := ""
				if p.Name != nil {
					n = *p.Name
				}
				ports[n] = int(*p.Port)
			}
		}
		for _, e := range s.Endpoints {
			ready := e.Conditions.Ready == nil || *e.Conditions.Ready
			for _, a := range e.Addresses {
				ep := Endpoint{IP: a, Ready: ready, Ports: ports}
				if e.NodeName != nil {
					ep.Node = *e.NodeName
				}
				if e.TargetRef != nil && e.TargetRef.Kind == "Pod" {
					ep.Pod = e.TargetRef.Name
				}
				out = append(out, ep)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].IP < out[j].IP })
	return out
}

// resolve asks the first cluster DNS address for the Service's name.
func (in *Inspector) resolve(ctx context.Context, namespace, name string, svc *corev1.Service) *DNSResult {
	if len(in.DNS) == 0 {
		return nil
	}
	fqdn := name + "." + namespace + ".svc." + strings.TrimSuffix(in.Domain, ".") + "."
	server := netip.AddrPortFrom(in.DNS[0], 53).String()
	qtype := mdns.TypeA
	if svc != nil && len(svc.Spec.IPFamilies) > 0 && svc.Spec.IPFamilies[0] == corev1.IPv6Protocol {
		qtype = mdns.TypeAAAA
	}
	res := &DNSResult{Name: fqdn, Server: server}
	query := in.Query
	if query == nil {
		query = exchange
	}
	start := time.Now()
	m, err := query(ctx, server, fqdn, qtype)
	res.Millis = msSince(start)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	res.Rcode = mdns.RcodeToString[m.Rcode]
	for _, rr := range m.Answer {
		switch rr := rr.(type) {
		case *mdns.A:
			res.Answers = append(res.Answers, rr.A.String())
		case *mdns.AAAA:
			res.Answers = append(res.Answers, rr.AAAA.String())
		case *mdns.CNAME:
			res.Answers = append(res.Answers, "CNAME "+rr.Target)
		}
	}
	return res
}

func exchange(ctx context.Context, server, name string, qtype uint16) (*mdns.Msg, error) {
	c := &mdns.Client{Timeout: 2 * time.Second}
	q := new(mdns.Msg)
	q.SetQuestion(name, qtype)
	m, _, err := c.ExchangeContext(ctx, q, server)
	return m, err
}

func msSince(t time.Time) float64 {
	return float64(time.Since(t).Microseconds()) / 1000
}

// rules finds each Service port's ClusterIP in the proxy's verdict maps
// and the DNAT targets of the chain it jumps to.
func (in *Inspector) rules(ctx context.Context, svc *corev1.Service, rep *NodeReport) []PortRules {
	if svc.Spec.Type == corev1.ServiceTypeExternalName || svc.Spec.ClusterIP == corev1.ClusterIPNone {
		return nil
	}
	elems := map[string][]*knftables.Element{}
	mapElems := func(name string) []*knftables.Element {
		if e, ok := elems[name]; ok {
			return e
		}
		e, err := in.Tables.Elements(ctx, name)
		if err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("nftables map %s: %v", name, err))
		}
		elems[name] = e
		return e
	}
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	var out []PortRules
	for _, cip := range clusterIPs(svc) {
		ip, err := netip.ParseAddr(cip)
		if err != nil {
			continue
		}
		v6 := ip.Is6()
		for _, sp := range svc.Spec.Ports {
			proto := strings.ToLower(string(sp.Protocol))
			if proto == "" {
				proto = "tcp"
			}
			pr := PortRules{Port: sp.Name, Protocol: proto, Number: int(sp.Port), ClusterIP: cip}
			if slices.Contains(in.DNS, ip) {
				pr.Local = true
				out = append(out, pr)
				continue
			}
			key := []string{cip, proto, strconv.Itoa(int(sp.Port))}
			for _, m := range []string{proxy.ServiceIPsMap(v6), proxy.NoEndpointServicesMap(v6)} {
				for _, e := range mapElems(m) {
					if slices.Equal(e.Key, key) {
						pr.Map, pr.Verdict = m, strings.Join(e.Value, " ")
					}
				}
				if pr.Map != "" {
					break
				}
			}
			pr.Chain = proxy.ServiceChain(v6, svc.Namespace, svc.Name, proto, sp.Name, local)
			if pr.Map == proxy.ServiceIPsMap(v6) {
				if target, ok := strings.CutPrefix(pr.Verdict, "goto "); ok {
					pr.Chain = target
				}
				pr.ChainFound, pr.Endpoints = in.dnatTargets(ctx, pr.Chain, rep, 0, key)
			}
			out = append(out, pr)
		}
	}
	return out
}

var (
	dnatTo  = regexp.MustCompile(`dnat ip6? to (\[?[0-9a-fA-F.:]+\]?:[0-9]+)`)
	jumpTo  = regexp.MustCompile(`(?:goto|jump) (\S+)`)
	mapRef  = regexp.MustCompile(`map @(\S+)`)
	vmapRef = regexp.MustCompile(`vmap @(\S+)`)
)

// dnatTargets collects the "ip:port" DNAT targets reachable from a chain:
// its own dnat rules, the endpoint chains it jumps to, the endpoint maps it
// looks up (Services with more than 32 endpoints), and for a shared pick
// chain the elements of the shared endpoints map that belong to key
// (ClusterIP, protocol, port).
func (in *Inspector) dnatTargets(ctx context.Context, chain string, rep *NodeReport, depth int, key []string) (bool, []string) {
	rules, found, err := in.Tables.ChainRules(ctx, chain)
	if err != nil {
		rep.Errors = append(rep.Errors, fmt.Sprintf("nftables chain %s: %v", chain, err))
		return false, nil
	}
	var out []string
	add := func(t string) {
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	for _, r := range rules {
		r = strings.ReplaceAll(r, `"`, "") // nft may quote names holding "/"
		if m := vmapRef.FindStringSubmatch(r); m != nil && depth < 2 {
			for _, e := range in.mapValues(ctx, m[1], rep, nil) {
				if t, ok := strings.CutPrefix(e, "goto "); ok {
					_, sub := in.dnatTargets(ctx, t, rep, depth+1, key)
					for _, s := range sub {
						add(s)
					}
				}
			}
			continue
		}
		if m := mapRef.FindStringSubmatch(r); m != nil {
			var filter func(*knftables.Element) bool
			if strings.HasPrefix(chain, "pick-") {
				// The shared map: (ClusterIP . port . index) -> endpoint.
				filter = func(e *knftables.Element) bool {
					return len(e.Key) == 3 && e.Key[0] == key[0] && e.Key[1] == key[2]
				}
			}
			for _, e := range in.mapValues(ctx, m[1], rep, filter) {
				// "10.42.1.5 . 8080" -> 10.42.1.5:8080
				if a, p, ok := strings.Cut(e, " . "); ok {
					add(hostPort(a, p))
				}
			}
			continue
		}
		if m := dnatTo.FindStringSubmatch(r); m != nil {
			add(m[1])
			continue
		}
		if m := jumpTo.FindStringSubmatch(r); m != nil && depth < 2 && strings.HasPrefix(m[1], "endpoint-") {
			_, sub := in.dnatTargets(ctx, m[1], rep, depth+1, key)
			for _, s := range sub {
				add(s)
			}
		}
	}
	sort.Strings(out)
	return found, out
}

func (in *Inspector) mapValues(ctx context.Context, name string, rep *NodeReport, filter func(*knftables.Element) bool) []string {
	elems, err := in.Tables.Elements(ctx, name)
	if err != nil {
		rep.Errors = append(rep.Errors, fmt.Sprintf("nftables map %s: %v", name, err))
		return nil
	}
	var out []string
	for _, e := range elems {
		if filter != nil && !filter(e) {
			continue
		}
		out = append(out, strings.Join(e.Value, " . "))
	}
	return out
}

func hostPort(a, p string) string {
	if ip, err := netip.ParseAddr(a); err == nil && ip.Is6() {
		return "[" + a + "]:" + p
	}
	return a + ":" + p
}

const probeTimeout = 2 * time.Second

// probes connects to every TCP ClusterIP:port and to every ready
// endpoint's target port. UDP is not probed: without knowing the
// application's protocol, silence proves nothing.
func (in *Inspector) probes(ctx context.Context, svc *corev1.Service, eps []Endpoint) []Probe {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	var targets []Probe
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		for _, cip := range clusterIPs(svc) {
			ip, err := netip.ParseAddr(cip)
			if err != nil || slices.Contains(in.DNS, ip) {
				continue
			}
			for _, sp := range svc.Spec.Ports {
				if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
					continue
				}
				targets = append(targets, Probe{Kind: "clusterIP", Target: hostPort(cip, strconv.Itoa(int(sp.Port))), Port: sp.Name, Protocol: "tcp"})
			}
		}
	}
	for _, sp := range svc.Spec.Ports {
		if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
			continue
		}
		for _, e := range eps {
			port, ok := e.Ports[sp.Name]
			if !e.Ready || !ok {
				continue
			}
			targets = append(targets, Probe{Kind: "endpoint", Target: hostPort(e.IP, strconv.Itoa(port)), Port: sp.Name,
				Pod: e.Pod, Node: e.Node, Protocol: "tcp"})
		}
	}
	dial := in.Dial
	if dial == nil {
		d := &net.Dialer{Timeout: probeTimeout}
		dial = d.DialContext
	}
	for i := range targets {
		p := &targets[i]
		start := time.Now()
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		c, err := dial(pctx, "tcp", p.Target)
		cancel()
		p.Millis = msSince(start)
		if err == nil {
			p.OK = true
			c.Close()
			continue
		}
		p.Error = err.Error()
		p.Refused = errors.Is(err, syscall.ECONNREFUSED)
		var ne net.Error
		p.Timeout = (errors.As(err, &ne) && ne.Timeout()) || errors.Is(err, context.DeadlineExceeded)
	}
	return targets
}

// mtuProbes probe every ready endpoint on another node once.
func (in *Inspector) mtuProbes(ctx context.Context, eps []Endpoint) []MTUProbe {
	var out []MTUProbe
	seen := map[string]bool{}
	for _, e := range eps {
		if !e.Ready || e.Node == in.Node || seen[e.IP] {
			continue
		}
		seen[e.IP] = true
		ip, err := netip.ParseAddr(e.IP)
		if err != nil {
			continue
		}
		p := MTUProbe{Target: e.IP, Node: e.Node}
		mtu, err := in.Net.RouteMTU(ip)
		if err != nil {
			p.Error = err.Error()
			out = append(out, p)
			continue
		}
		p.Size = mtu
		small := 64
		if ip.Is6() {
			small = 96
		}
		// Two tries each: ICMP errors are rate limited.
		for range 2 {
			if p.SmallOK, err = in.Net.ProbeMTU(ctx, ip, small); p.SmallOK {
				break
			}
		}
		if err != nil && !p.SmallOK {
			p.Error = err.Error()
		}
		if p.SmallOK {
			for range 2 {
				if p.BigOK, err = in.Net.ProbeMTU(ctx, ip, mtu); p.BigOK {
					break
				}
			}
			if err != nil && !p.BigOK {
				p.Error = err.Error()
			}
		}
		out = append(out, p)
	}
	return out
}
