// Package ingress owns knit's built-in HTTP(S) entry point: it turns the
// Ingresses of knit's IngressClass into one immutable routing table and
// reverse-proxies requests straight to the Ready endpoints of the Services
// they name.
//
// Data flow:
//
//	shared informer cache (Ingresses, IngressClasses, Services,
//	EndpointSlices, kubernetes.io/tls Secrets)
//	    | event handlers: "something this table depends on changed" -> kick
//	    v
//	sync loop (rate-limited, plus a periodic resync)
//	    | build: classes -> served Ingresses (oldest first) -> host groups,
//	    |        path rules, backends with endpoints, certificates, problems
//	    v
//	atomic.Pointer[table].Store  -------------------+---> status writer (Lease holder only):
//	    |                                           |     status.loadBalancer + Events
//	    v                                           |
//	:80 / :443 accept loops, one goroutine per connection
//	    | TLS: certificate by SNI from the table; ALPN h2 -> net/http's HTTP/2 server
//	    v
//	HTTP/1.1 fast path (forward.go): parse head in place -> table.lookup ->
//	    pooled keep-alive endpoint connection (P2C, passive ejection, retry
//	    before anything was sent) -> head + body out, response head + body back
//	HTTP/2 clients and h2c backends (slow.go): httputil.ReverseProxy and
//	    an HTTP/2 Transport over the same table, balancer and health state
//
// Matching follows the Ingress API documentation exactly (see
// table.lookup): Exact and Prefix paths (Prefix by path element, trailing
// slash ignored, ImplementationSpecific treated as Prefix), longest match
// first and Exact over Prefix, exact hosts before "*.wildcards" (one label)
// before rules without a host, hosts compared without port and case. When
// no path matches: the most specific host group's Ingress defaultBackend,
// then an Ingress that has only a defaultBackend, then the controller-wide
// default, else 404 — never some other upstream. Conflicting claims go to
// the oldest Ingress and the others get an Event.
//
// The ingress lives in the agent process, so while the agent restarts
// nothing listens on its ports. With Config.RestartGuard (on in
// DefaultConfig) a small nftables table, inet knit-ingress, drops new
// connections' SYNs in that gap instead of letting the kernel refuse them:
// the client's TCP retries and reaches the next ingress (guard.go).
//
// A request keeps the table it started with; a swap affects only requests
// that start after it, and endpoint connection pools and health state live
// in a registry that outlives tables, so changes cost no reload and drop no
// request.
package ingress
