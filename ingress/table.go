package ingress

import (
	"bytes"
	"crypto/tls"
)

// table is one immutable routing state: built whole by the sync loop from
// the informer cache and published with one atomic pointer store. A request
// loads the pointer once and uses that table to the end, so a swap never
// changes the rules under a request in flight, and nothing is locked on the
// request path.
type table struct {
	exact map[string]*hostGroup // "foo.bar.com"
	wild  map[string]*hostGroup // "*.foo.com" stored under "foo.com"
	any   *hostGroup            // rules without a host, and Ingress-level catch-alls
	// fallback is the controller-wide default backend (nil: answer 404).
	fallback *route

	certs certTable
	// routes counts the installed path rules (for logs and tests).
	routes int
}

// hostGroup is every rule for one host (or wildcard, or no host), merged
// across Ingresses.
type hostGroup struct {
	host   string            // as written in the Ingress: metrics label
	exact  map[string]*route // Exact paths, as written
	prefix map[string]*route // Prefix paths without trailing '/', never "/"
	root   *route            // Prefix "/"
	// fallback is the defaultBackend of the oldest Ingress with rules in
	// this group that has one.
	fallback *route
}

// route is where a request goes.
type route struct {
	host        string // rule host label ("" for none)
	path        string // rule path as written ("" for default backends)
	exact       bool
	ingress     string // "namespace/name" of the Ingress that owns it
	backend     *backend
	sslRedirect bool
	metrics     *routeMetrics
}

// backendKind says how a backend is answered.
type backendKind uint8

const (
	// kindService forwards to the Ready endpoints of a Service port.
	kindService backendKind = iota
	// kindError answers locally with status and msg: Resource backends,
	// unknown Services or ports.
	kindError
)

// backend is a resolved Service port.
type backend struct {
	name   string // "namespace/service:port": metrics label
	kind   backendKind
	status int
	msg    string
	h2c    bool // appProtocol kubernetes.io/h2c: HTTP/2 without TLS
	eps    []*upstream
}

// certTable maps SNI names to certificates.
type certTable struct {
	exact map[string]*tls.Certificate
	wild  map[string]*tls.Certificate // "*.foo.com" under "foo.com"
}

// lookup finds the route for a request. host must already be lower-case
// and without port (see normalizeHost); path is the raw path without query.
//
// Precedence, as the Ingress API documents it:
//  1. host groups are tried most specific first: the exact host, then the
//     wildcard covering exactly one more label, then rules without a host;
//     the first group with a matching path wins;
//  2. within a group the longest matching path wins, and an Exact path
//     beats a Prefix path of the same length;
//  3. with no matching path, the most specific group's default backend,
//     then the controller-wide default; nil means 404.
//
// It allocates nothing: map lookups with string(b) keys do not copy.
func (t *table) lookup(host, path []byte) *route {
	var groups [3]*hostGroup
	n := 0
	if g := t.exact[string(host)]; g != nil {
		groups[n] = g
		n++
	}
	if i := bytes.IndexByte(host, '.'); i > 0 {
		if g := t.wild[string(host[i+1:])]; g != nil {
			groups[n] = g
			n++
		}
	}
	if t.any != nil {
		groups[n] = t.any
		n++
	}
	for _, g := range groups[:n] {
		if r := g.match(path); r != nil {
			return r
		}
	}
	for _, g := range groups[:n] {
		if g.fallback != nil {
			return g.fallback
		}
	}
	return t.fallback
}

// match applies the path rules of one group.
func (g *hostGroup) match(path []byte) *route {
	// An Exact match is as long as the whole path, so it is at least as
	// long as any Prefix match and wins ties: check it first.
	if len(g.exact) > 0 {
		if r := g.exact[string(path)]; r != nil {
			return r
		}
	}
	if len(g.prefix) > 0 {
		// Try the path cut at each element boundary, longest first.
		// Prefix keys carry no trailing '/', so "/foo/" and "/foo" both
		// match rule "/foo" (and rule "/foo/", stored as "/foo"), while
		// "/foobar" does not.
		p := path
		for {
			for len(p) > 1 && p[len(p)-1] == '/' {
				p = p[:len(p)-1]
			}
			if len(p) <= 1 {
				break
			}
			if r := g.prefix[string(p)]; r != nil {
				return r
			}
			p = p[:bytes.LastIndexByte(p, '/')]
		}
	}
	return g.root
}

// cert picks the certificate for an SNI name (already lower-case): exact
// name, then a wildcard covering one label; nil if neither.
func (c *certTable) cert(name string) *tls.Certificate {
	if cert := c.exact[name]; cert != nil {
		return cert
	}
	for i := 0; i < len(name); i++ {
		if name[i] == '.' {
			if i > 0 {
				return c.wild[name[i+1:]]
			}
			break
		}
	}
	return nil
}

// normalizeHost lower-cases host into dst, without the port and one
// trailing dot, and returns it. Hosts are matched case-insensitively and
// regardless of the port (RFC 9110 section 4.2.3).
func normalizeHost(dst, host []byte) []byte {
	dst = dst[:0]
	if len(host) > 0 && host[0] == '[' {
		if i := bytes.IndexByte(host, ']'); i > 0 {
			host = host[:i+1]
		}
	} else if i := bytes.IndexByte(host, ':'); i >= 0 {
		host = host[:i]
	}
	if len(host) > 0 && host[len(host)-1] == '.' {
		host = host[:len(host)-1]
	}
	for _, c := range host {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return dst
}
