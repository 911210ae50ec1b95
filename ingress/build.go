package ingress

import (
	"crypto/tls"
	"fmt"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
)

// buildInput is the cache content a build reads. The controller fills it
// from listers; tests fill it directly or from fake informers.
type buildInput struct {
	ingresses []*networkingv1.Ingress
	classes   []*networkingv1.IngressClass
	service   func(namespace, name string) *corev1.Service
	slices    func(namespace, service string) []*discoveryv1.EndpointSlice
	secret    func(namespace, name string) *corev1.Secret
}

// problem is something wrong with an Ingress (or, with an empty ingress,
// with the controller's own settings), reported as an Event and a metric.
type problem struct {
	ingress types.NamespacedName
	reason  string
	message string
}

// Problem reasons (Event reasons).
const (
	reasonInvalidHost        = "InvalidHost"
	reasonInvalidPath        = "InvalidPath"
	reasonServiceNotFound    = "ServiceNotFound"
	reasonPortNotFound       = "ServicePortNotFound"
	reasonUnsupportedBackend = "UnsupportedBackend"
	reasonSecretNotFound     = "TLSSecretNotFound"
	reasonSecretInvalid      = "TLSSecretInvalid"
	reasonCertMismatch       = "TLSCertificateMismatch"
	reasonConflict           = "Conflict"
)

// buildResult is a table and what was learned building it.
type buildResult struct {
	table    *table
	problems []problem
	// served are the Ingresses of knit's classes, oldest first.
	served []*networkingv1.Ingress
	// refs are the Services and Secrets the table depends on; changes to
	// other objects of those kinds cannot change the table.
	refs refSet
}

// refSet names the objects a table was built from ("namespace/name").
type refSet struct {
	services map[string]struct{}
	secrets  map[string]struct{}
}

// builder turns cache content into a routing table. It is owned by the
// sync loop; the upstream registry and certificate cache carry state
// from one build to the next.
type builder struct {
	cfg   *Config
	ups   *upstreams
	certs *certCache
	m     *metrics
	gen   uint64

	// per build
	in       *buildInput
	problems []problem
	backends map[backendKey]*backend
	rmetrics map[[2]string]*routeMetrics
	refs     refSet
}

type backendKey struct {
	namespace, name, port string
}

// build makes a table from the cache content. It never fails: whatever is
// wrong with an Ingress is reported and the rest is served.
func (b *builder) build(in *buildInput) *buildResult {
	b.gen++
	b.in = in
	b.problems = nil
	b.backends = map[backendKey]*backend{}
	b.rmetrics = map[[2]string]*routeMetrics{}
	b.refs = refSet{services: map[string]struct{}{}, secrets: map[string]struct{}{}}

	t := &table{
		exact: map[string]*hostGroup{},
		wild:  map[string]*hostGroup{},
		certs: certTable{exact: map[string]*tls.Certificate{}, wild: map[string]*tls.Certificate{}},
	}
	served := servedIngresses(in.ingresses, in.classes, b.cfg)
	// Oldest first: on any conflict the oldest Ingress keeps what it
	// claimed, whatever order the cache lists objects in.
	sort.SliceStable(served, func(i, j int) bool { return olderThan(served[i], served[j]) })

	owners := map[*route]*networkingv1.Ingress{}
	certOwner := map[string]string{}
	for _, ing := range served {
		b.addIngress(t, ing, owners)
		b.addTLS(t, ing, certOwner)
	}
	if b.cfg.DefaultBackend != "" {
		ref, _ := parseServiceRef(b.cfg.DefaultBackend)
		port := ref.portName
		if port == "" {
			port = strconv.Itoa(int(ref.portNumber))
		}
		be := b.resolve(types.NamespacedName{}, ref.namespace, &networkingv1.IngressServiceBackend{
			Name: ref.name, Port: networkingv1.ServiceBackendPort{Name: ref.portName, Number: ref.portNumber},
		}, port)
		t.fallback = b.newRoute("", "", false, "", be, false)
	}
	if b.cfg.StatusFromService != "" {
		b.refs.services[b.cfg.StatusFromService] = struct{}{}
	}
	b.certs.sweep()
	b.in = nil
	return &buildResult{table: t, problems: b.problems, served: served, refs: b.refs}
}

func (b *builder) report(ing *networkingv1.Ingress, reason, format string, args ...any) {
	p := problem{reason: reason, message: fmt.Sprintf(format, args...)}
	if ing != nil {
		p.ingress = types.NamespacedName{Namespace: ing.Namespace, Name: ing.Name}
	}
	b.problems = append(b.problems, p)
}

func olderThan(a, b *networkingv1.Ingress) bool {
	ta, tb := a.CreationTimestamp.Time, b.CreationTimestamp.Time
	if !ta.Equal(tb) {
		return ta.Before(tb)
	}
	if a.Namespace != b.Namespace {
		return a.Namespace < b.Namespace
	}
	return a.Name < b.Name
}

// servedIngresses picks the Ingresses knit serves: those whose class
// (spec.ingressClassName, else the legacy annotation) is one of knit's,
// and those without a class when one of knit's classes is the default (or
// WatchIngressWithoutClass is set).
func servedIngresses(ings []*networkingv1.Ingress, classes []*networkingv1.IngressClass, cfg *Config) []*networkingv1.Ingress {
	ours := map[string]bool{}
	isDefault := false
	for _, c := range classes {
		if c.Spec.Controller != cfg.ControllerName {
			continue
		}
		ours[c.Name] = true
		if c.Annotations[annotationDefaultClass] == "true" {
			isDefault = true
		}
	}
	var out []*networkingv1.Ingress
	for _, ing := range ings {
		var class string
		switch {
		case ing.Spec.IngressClassName != nil:
			class = *ing.Spec.IngressClassName
		case ing.Annotations[annotationLegacyClass] != "":
			class = ing.Annotations[annotationLegacyClass]
		}
		if class != "" && ours[class] || class == "" && (isDefault || cfg.WatchIngressWithoutClass) {
			out = append(out, ing)
		}
	}
	return out
}

// group returns the host group for a rule host, creating it.
func group(t *table, host string) *hostGroup {
	var m map[string]*hostGroup
	key := host
	switch {
	case host == "":
		if t.any == nil {
			t.any = &hostGroup{}
		}
		return t.any
	case strings.HasPrefix(host, "*."):
		m, key = t.wild, host[2:]
	default:
		m = t.exact
	}
	g := m[key]
	if g == nil {
		g = &hostGroup{host: host}
		m[key] = g
	}
	return g
}

// validHost checks a rule host the way the API server does: a lower-case
// DNS subdomain, or "*." and one.
func validHost(h string) error {
	var errs []string
	if strings.HasPrefix(h, "*") {
		errs = validation.IsWildcardDNS1123Subdomain(h)
	} else {
		errs = validation.IsDNS1123Subdomain(h)
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// validPath checks an Exact or Prefix path the way the API server does.
func validPath(p string) error {
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("must be an absolute path")
	}
	for _, bad := range []string{"//", "/./", "/../", "%2f", "%2F"} {
		if strings.Contains(p, bad) {
			return fmt.Errorf("must not contain %q", bad)
		}
	}
	for _, bad := range []string{"/..", "/."} {
		if strings.HasSuffix(p, bad) {
			return fmt.Errorf("must not end with %q", bad)
		}
	}
	for i := 0; i < len(p); i++ {
		if !targetByte[p[i]] || p[i] == '?' {
			return fmt.Errorf("must not contain %q", p[i])
		}
	}
	return nil
}

func (b *builder) addIngress(t *table, ing *networkingv1.Ingress, owners map[*route]*networkingv1.Ingress) {
	name := ing.Namespace + "/" + ing.Name
	redirect := ing.Annotations[AnnotationSSLRedirect] == "true"
	var defRoute *route
	if db := ing.Spec.DefaultBackend; db != nil {
		be := b.resolveIngressBackend(ing, db)
		defRoute = b.newRoute("", "", false, name, be, redirect)
	}
	claimFallback := func(g *hostGroup) {
		if defRoute == nil {
			return
		}
		switch prev := g.fallback; {
		case prev == nil:
			r := *defRoute
			r.host = g.host
			r.metrics = b.routeMetrics(g.host, r.backend.name)
			g.fallback = &r
			owners[g.fallback] = ing
		case prev.ingress != name:
			b.report(ing, reasonConflict, "defaultBackend for host %q is ignored: Ingress %s (older) already sets one", hostLabel(g.host), prev.ingress)
		}
	}
	if len(ing.Spec.Rules) == 0 && defRoute != nil {
		// An Ingress with only a defaultBackend is a catch-all.
		claimFallback(group(t, ""))
	}
	for _, rule := range ing.Spec.Rules {
		if rule.Host != "" {
			if err := validHost(rule.Host); err != nil {
				b.report(ing, reasonInvalidHost, "host %q: %v", rule.Host, err)
				continue
			}
		}
		g := group(t, rule.Host)
		claimFallback(g)
		if rule.HTTP == nil {
			continue
		}
		for _, p := range rule.HTTP.Paths {
			pt := networkingv1.PathTypeImplementationSpecific
			if p.PathType != nil {
				pt = *p.PathType
			}
			path := p.Path
			if path == "" && pt == networkingv1.PathTypeImplementationSpecific {
				path = "/"
			}
			if pt != networkingv1.PathTypeExact && pt != networkingv1.PathTypePrefix && pt != networkingv1.PathTypeImplementationSpecific {
				b.report(ing, reasonInvalidPath, "host %q path %q: unknown pathType %q", hostLabel(rule.Host), p.Path, pt)
				continue
			}
			if err := validPath(path); err != nil {
				b.report(ing, reasonInvalidPath, "host %q path %q: %v", hostLabel(rule.Host), p.Path, err)
				continue
			}
			exact := pt == networkingv1.PathTypeExact
			// ImplementationSpecific is documented to behave like Prefix.
			// Prefix keys drop trailing slashes ("/foo/" is "/foo"; "/" is
			// the root slot).
			key := strings.TrimRight(path, "/")
			if exact {
				key = path
			}
			existing := b.lookupSlot(g, exact, key)
			if existing != nil {
				if existing.ingress != name {
					b.report(ing, reasonConflict, "host %q path %q (%s) is ignored: Ingress %s (older) already routes it",
						hostLabel(rule.Host), p.Path, pathTypeName(exact), existing.ingress)
				} else if existing.backend != b.resolveIngressBackend(ing, &p.Backend) {
					b.report(ing, reasonConflict, "host %q path %q (%s) appears twice with different backends; the first is used",
						hostLabel(rule.Host), p.Path, pathTypeName(exact))
				}
				continue
			}
			be := b.resolveIngressBackend(ing, &p.Backend)
			r := b.newRoute(rule.Host, p.Path, exact, name, be, redirect)
			b.storeSlot(g, exact, key, r)
			owners[r] = ing
			t.routes++
		}
	}
}

func (b *builder) lookupSlot(g *hostGroup, exact bool, key string) *route {
	switch {
	case exact:
		return g.exact[key]
	case key == "":
		return g.root
	default:
		return g.prefix[key]
	}
}

func (b *builder) storeSlot(g *hostGroup, exact bool, key string, r *route) {
	switch {
	case exact:
		if g.exact == nil {
			g.exact = map[string]*route{}
		}
		g.exact[key] = r
	case key == "":
		g.root = r
	default:
		if g.prefix == nil {
			g.prefix = map[string]*route{}
		}
		g.prefix[key] = r
	}
}

func pathTypeName(exact bool) string {
	if exact {
		return "Exact"
	}
	return "Prefix"
}

func hostLabel(h string) string {
	if h == "" {
		return "*"
	}
	return h
}

func (b *builder) newRoute(host, path string, exact bool, ingress string, be *backend, redirect bool) *route {
	return &route{
		host:        host,
		path:        path,
		exact:       exact,
		ingress:     ingress,
		backend:     be,
		sslRedirect: redirect,
		metrics:     b.routeMetrics(host, be.name),
	}
}

func (b *builder) routeMetrics(host, backend string) *routeMetrics {
	k := [2]string{host, backend}
	rm := b.rmetrics[k]
	if rm == nil {
		rm = b.m.forRoute(host, backend)
		b.rmetrics[k] = rm
	}
	return rm
}

func (b *builder) resolveIngressBackend(ing *networkingv1.Ingress, ib *networkingv1.IngressBackend) *backend {
	key := types.NamespacedName{Namespace: ing.Namespace, Name: ing.Name}
	switch {
	case ib.Resource != nil:
		r := ib.Resource
		group := ""
		if r.APIGroup != nil {
			group = *r.APIGroup
		}
		name := "resource:" + r.Kind + "/" + r.Name
		bk := backendKey{namespace: ing.Namespace, name: name}
		if be := b.backends[bk]; be != nil {
			return be
		}
		b.report(ing, reasonUnsupportedBackend, "resource backend %s %s/%s: knit only forwards to Services; requests get 503", group, r.Kind, r.Name)
		be := &backend{name: ing.Namespace + "/" + name, kind: kindError, status: 503,
			msg: "this path has a Resource backend (" + r.Kind + " " + r.Name + "), which knit does not serve"}
		b.backends[bk] = be
		return be
	case ib.Service == nil:
		b.report(ing, reasonUnsupportedBackend, "backend names neither a Service nor a resource")
		return &backend{name: ing.Namespace + "/-", kind: kindError, status: 503, msg: "this path has no backend"}
	}
	port := ib.Service.Port.Name
	if port == "" {
		port = strconv.Itoa(int(ib.Service.Port.Number))
	}
	return b.resolve(key, ing.Namespace, ib.Service, port)
}

// resolve turns a Service port into a backend with the Ready endpoints of
// that port, resolving the target port through the EndpointSlices' port
// names (so a named targetPort that differs per pod works).
func (b *builder) resolve(ing types.NamespacedName, ns string, sb *networkingv1.IngressServiceBackend, port string) *backend {
	bk := backendKey{namespace: ns, name: sb.Name, port: port}
	if be := b.backends[bk]; be != nil {
		return be
	}
	name := ns + "/" + sb.Name + ":" + port
	be := &backend{name: name}
	b.backends[bk] = be
	b.refs.services[ns+"/"+sb.Name] = struct{}{}
	fail := func(reason, msg string) *backend {
		be.kind, be.status, be.msg = kindError, 503, msg
		b.problems = append(b.problems, problem{ingress: ing, reason: reason, message: msg})
		return be
	}
	svc := b.in.service(ns, sb.Name)
	if svc == nil {
		return fail(reasonServiceNotFound, "service "+ns+"/"+sb.Name+" not found")
	}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return fail(reasonUnsupportedBackend, "service "+ns+"/"+sb.Name+" is of type ExternalName, which knit does not proxy to")
	}
	var sp *corev1.ServicePort
	for i := range svc.Spec.Ports {
		p := &svc.Spec.Ports[i]
		if (sb.Port.Name != "" && p.Name == sb.Port.Name) || (sb.Port.Name == "" && p.Port == sb.Port.Number) {
			sp = p
			break
		}
	}
	if sp == nil {
		return fail(reasonPortNotFound, "service "+ns+"/"+sb.Name+" has no port "+port)
	}
	be.h2c = sp.AppProtocol != nil && *sp.AppProtocol == appProtocolH2C
	var addrs []string
	seen := map[string]bool{}
	for _, sl := range b.in.slices(ns, sb.Name) {
		if sl.AddressType != discoveryv1.AddressTypeIPv4 && sl.AddressType != discoveryv1.AddressTypeIPv6 {
			continue
		}
		var num int32
		found := false
		for _, p := range sl.Ports {
			pn := ""
			if p.Name != nil {
				pn = *p.Name
			}
			if pn == sp.Name && p.Port != nil {
				num, found = *p.Port, true
				if p.AppProtocol != nil && *p.AppProtocol == appProtocolH2C {
					be.h2c = true
				}
				break
			}
		}
		if !found {
			continue
		}
		for _, ep := range sl.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				addr := net.JoinHostPort(a, strconv.Itoa(int(num)))
				if !seen[addr] {
					seen[addr] = true
					addrs = append(addrs, addr)
				}
			}
		}
	}
	slices.Sort(addrs)
	for _, a := range addrs {
		be.eps = append(be.eps, b.ups.get(a, be.h2c, b.gen))
	}
	if len(be.eps) == 0 {
		be.msg = "no ready endpoints for " + name
	}
	return be
}

// addTLS installs the certificates an Ingress names. An entry without
// hosts covers the Ingress's own rule hosts.
func (b *builder) addTLS(t *table, ing *networkingv1.Ingress, owner map[string]string) {
	name := ing.Namespace + "/" + ing.Name
	for _, e := range ing.Spec.TLS {
		hosts := e.Hosts
		if len(hosts) == 0 {
			for _, r := range ing.Spec.Rules {
				if r.Host != "" {
					hosts = append(hosts, r.Host)
				}
			}
		}
		if e.SecretName == "" || len(hosts) == 0 {
			continue
		}
		b.refs.secrets[ing.Namespace+"/"+e.SecretName] = struct{}{}
		sec := b.in.secret(ing.Namespace, e.SecretName)
		if sec == nil {
			b.report(ing, reasonSecretNotFound, "TLS secret %s/%s not found; serving the default self-signed certificate for %s",
				ing.Namespace, e.SecretName, strings.Join(hosts, ", "))
			continue
		}
		cert, err := b.certs.get(sec)
		if err != nil {
			b.report(ing, reasonSecretInvalid, "TLS secret %s/%s: %v; serving the default self-signed certificate for %s",
				ing.Namespace, e.SecretName, err, strings.Join(hosts, ", "))
			continue
		}
		for _, h := range hosts {
			h = strings.ToLower(h)
			if err := validHost(h); err != nil {
				b.report(ing, reasonInvalidHost, "TLS host %q: %v", h, err)
				continue
			}
			if prev, ok := owner[h]; ok {
				if prev != name {
					b.report(ing, reasonConflict, "TLS host %q is ignored: Ingress %s (older) already has a certificate for it", h, prev)
				}
				continue
			}
			if !certCovers(cert, h) {
				b.report(ing, reasonCertMismatch, "certificate in secret %s/%s does not cover host %q", ing.Namespace, e.SecretName, h)
			}
			owner[h] = name
			if strings.HasPrefix(h, "*.") {
				t.certs.wild[h[2:]] = cert
			} else {
				t.certs.exact[h] = cert
			}
		}
	}
}
