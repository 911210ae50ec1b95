package dns

import (
	"net/netip"
	"sort"
	"strings"

	mdns "github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// SchemaVersion is the version of the Kubernetes DNS-Based Service Discovery
// specification implemented (kubernetes/dns docs/specification.md).
const SchemaVersion = "1.1.0"

// recordBuilder turns cluster objects into the records of the specification.
type recordBuilder struct {
	zone string // "cluster.local." lowercase FQDN
	ttl  uint32
	buf  []byte
}

func newRecordBuilder(zone string, ttl uint32) *recordBuilder {
	return &recordBuilder{zone: mdns.Fqdn(strings.ToLower(zone)), ttl: ttl, buf: make([]byte, maxName+1)}
}

// recordSet collects records by name, keeping first-seen name order.
type recordSet struct {
	b     *recordBuilder
	order []string
	by    map[string]*nameRRs
}

func (b *recordBuilder) newSet() *recordSet {
	return &recordSet{b: b, by: map[string]*nameRRs{}}
}

func (s *recordSet) add(name string, rr mdns.RR) {
	e := s.by[name]
	if e == nil {
		key, ok := wireName(name, s.b.buf)
		if !ok {
			return // longer than 255 bytes or a label over 63: no such name
		}
		e = &nameRRs{key: key, name: name}
		s.by[name] = e
		s.order = append(s.order, name)
	}
	if rr == nil {
		return
	}
	for _, have := range e.rrs {
		if mdns.IsDuplicate(have, rr) {
			return
		}
	}
	e.rrs = append(e.rrs, rr)
}

func (s *recordSet) list() []nameRRs {
	if len(s.order) == 0 {
		return nil
	}
	out := make([]nameRRs, 0, len(s.order))
	for _, n := range s.order {
		e := s.by[n]
		sortRRs(e.rrs)
		out = append(out, *e)
	}
	return out
}

// sortRRs orders records deterministically so that rebuilding an unchanged
// Service compares equal.
func sortRRs(rrs []mdns.RR) {
	sort.SliceStable(rrs, func(i, j int) bool {
		a, b := rrs[i], rrs[j]
		if a.Header().Rrtype != b.Header().Rrtype {
			return a.Header().Rrtype < b.Header().Rrtype
		}
		return a.String() < b.String()
	})
}

func (b *recordBuilder) hdr(name string, t uint16) mdns.RR_Header {
	return mdns.RR_Header{Name: name, Rrtype: t, Class: mdns.ClassINET, Ttl: b.ttl}
}

func (b *recordBuilder) addr(name string, ip netip.Addr) mdns.RR {
	ip = ip.Unmap()
	if ip.Is4() {
		a := ip.As4()
		return &mdns.A{Hdr: b.hdr(name, mdns.TypeA), A: a[:]}
	}
	a := ip.As16()
	return &mdns.AAAA{Hdr: b.hdr(name, mdns.TypeAAAA), AAAA: a[:]}
}

func (b *recordBuilder) ptr(ip netip.Addr, target string) (string, mdns.RR) {
	name, err := mdns.ReverseAddr(ip.Unmap().String())
	if err != nil {
		return "", nil
	}
	return name, &mdns.PTR{Hdr: b.hdr(name, mdns.TypePTR), Ptr: target}
}

// serviceName is <service>.<ns>.svc.<zone>.
func (b *recordBuilder) serviceName(ns, name string) string {
	return strings.ToLower(name) + "." + strings.ToLower(ns) + ".svc." + b.zone
}

// addressName is the name of an endpoint without a hostname: its address
// with dots (or colons) replaced by dashes, as CoreDNS does ("10-42-1-5",
// "fd42--5"). It is unique within a Service, as the specification asks.
func addressName(ip netip.Addr) string {
	s := ip.Unmap().String()
	if ip.Unmap().Is4() {
		return strings.ReplaceAll(s, ".", "-")
	}
	return strings.ReplaceAll(s, ":", "-")
}

// service returns the records of one Service (sections 2.3 to 2.5 of the
// specification). slices are the Service's EndpointSlices; they matter only
// for headless Services.
func (b *recordBuilder) service(svc *corev1.Service, slices []*discoveryv1.EndpointSlice) []nameRRs {
	set := b.newSet()
	base := b.serviceName(svc.Namespace, svc.Name)
	switch {
	case svc.Spec.Type == corev1.ServiceTypeExternalName:
		// 2.5: a CNAME to the external name.
		target := strings.ToLower(strings.TrimSpace(svc.Spec.ExternalName))
		if target == "" || !isDomainName(target) {
			return nil
		}
		set.add(base, &mdns.CNAME{Hdr: b.hdr(base, mdns.TypeCNAME), Target: mdns.Fqdn(target)})
	case svc.Spec.ClusterIP == corev1.ClusterIPNone:
		b.headless(set, svc, base, slices)
	case svc.Spec.ClusterIP != "":
		b.clusterIP(set, svc, base)
	}
	return set.list()
}

// clusterIP: 2.3. A/AAAA per ClusterIP, SRV per named port, PTR per
// ClusterIP.
func (b *recordBuilder) clusterIP(set *recordSet, svc *corev1.Service, base string) {
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	n := 0
	for _, s := range ips {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		n++
		set.add(base, b.addr(base, ip))
		if name, rr := b.ptr(ip, base); rr != nil {
			set.add(name, rr)
		}
	}
	if n == 0 {
		return
	}
	for _, p := range svc.Spec.Ports {
		if p.Name == "" {
			continue // unnamed ports have no SRV record
		}
		name := "_" + strings.ToLower(p.Name) + "._" + strings.ToLower(protocol(p.Protocol)) + "." + base
		set.add(name, &mdns.SRV{Hdr: b.hdr(name, mdns.TypeSRV), Priority: 0, Weight: 100, Port: uint16(p.Port), Target: base})
	}
}

func protocol(p corev1.Protocol) string {
	if p == "" {
		return string(corev1.ProtocolTCP)
	}
	return string(p)
}

type endpoint struct {
	ip       netip.Addr
	hostname string
	ports    []discoveryv1.EndpointPort
}

// headless: 2.4. A/AAAA per ready endpoint at the Service name and at
// <hostname>.<service>, SRV per (ready endpoint, named port) pointing at the
// hostname name, PTR per endpoint address. No ready endpoint: no name at
// all (the specification asks for NXDOMAIN).
func (b *recordBuilder) headless(set *recordSet, svc *corev1.Service, base string, slices []*discoveryv1.EndpointSlice) {
	var eps []endpoint
	seen := map[netip.Addr]string{}
	for _, sl := range slices {
		if sl.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		for _, e := range sl.Endpoints {
			// publishNotReadyAddresses: every endpoint counts as ready
			// (the EndpointSlice controller already marks them so; do
			// not depend on it).
			if !svc.Spec.PublishNotReadyAddresses && e.Conditions.Ready != nil && !*e.Conditions.Ready {
				continue
			}
			for _, a := range e.Addresses {
				ip, err := netip.ParseAddr(a)
				if err != nil {
					continue
				}
				ip = ip.Unmap()
				host := ""
				if e.Hostname != nil {
					host = strings.ToLower(*e.Hostname)
				}
				if host == "" || !isLabel(host) {
					host = addressName(ip)
				}
				// The same address in two slices (the controller
				// moving endpoints around): keep the first.
				if h, ok := seen[ip]; ok && h == host {
					continue
				}
				seen[ip] = host
				eps = append(eps, endpoint{ip: ip, hostname: host, ports: sl.Ports})
			}
		}
	}
	if len(eps) == 0 {
		return
	}
	srvs := map[string][]*mdns.SRV{}
	var srvOrder []string
	for _, ep := range eps {
		host := ep.hostname + "." + base
		set.add(base, b.addr(base, ep.ip))
		set.add(host, b.addr(host, ep.ip))
		if name, rr := b.ptr(ep.ip, host); rr != nil {
			set.add(name, rr)
		}
		for _, p := range ep.ports {
			if p.Name == nil || *p.Name == "" || p.Port == nil {
				continue
			}
			proto := corev1.ProtocolTCP
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			name := "_" + strings.ToLower(*p.Name) + "._" + strings.ToLower(string(proto)) + "." + base
			if _, ok := srvs[name]; !ok {
				srvOrder = append(srvOrder, name)
			}
			// A hostname with an address per family is one SRV target.
			dup := false
			for _, have := range srvs[name] {
				if have.Target == host && have.Port == uint16(*p.Port) {
					dup = true
					break
				}
			}
			if !dup {
				srvs[name] = append(srvs[name], &mdns.SRV{Hdr: b.hdr(name, mdns.TypeSRV), Port: uint16(*p.Port), Target: host})
			}
		}
	}
	for _, name := range srvOrder {
		rrs := srvs[name]
		// Equal priority, weights summing to about 100 (RFC 2782).
		w := uint16(100 / len(rrs))
		if w == 0 {
			w = 1
		}
		for _, rr := range rrs {
			rr.Weight = w
			set.add(name, rr)
		}
	}
}

// pod returns the record of a Pod in verified mode (2.6, deprecated but
// required): <a-b-c-d>.<ns>.pod.<zone> for each Pod IP.
func (b *recordBuilder) pod(p *corev1.Pod) []nameRRs {
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil // the IP has been released and may belong to another Pod
	}
	set := b.newSet()
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	for _, pip := range ips {
		ip, err := netip.ParseAddr(pip.IP)
		if err != nil {
			continue
		}
		name := addressName(ip) + "." + strings.ToLower(p.Namespace) + ".pod." + b.zone
		set.add(name, b.addr(name, ip))
	}
	return set.list()
}

// static returns the records every zone has: SOA and NS at the apex, the
// schema version, the name server's addresses, and the svc and pod
// subdomains (which exist even when empty).
func (b *recordBuilder) static(soa *mdns.SOA, nsIPs []netip.Addr, podRecords bool) []nameRRs {
	set := b.newSet()
	apex := b.zone
	set.add(apex, soa)
	nsName := "ns.dns." + apex
	set.add(apex, &mdns.NS{Hdr: b.hdr(apex, mdns.TypeNS), Ns: nsName})
	set.add(nsName, nil)
	for _, ip := range nsIPs {
		set.add(nsName, b.addr(nsName, ip))
	}
	version := "dns-version." + apex
	set.add(version, &mdns.TXT{Hdr: mdns.RR_Header{Name: version, Rrtype: mdns.TypeTXT, Class: mdns.ClassINET, Ttl: 28800}, Txt: []string{SchemaVersion}})
	set.add("svc."+apex, nil)
	if podRecords {
		set.add("pod."+apex, nil)
	}
	return set.list()
}

func isLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func isDomainName(s string) bool {
	_, ok := mdns.IsDomainName(s)
	return ok && len(s) <= 253
}
