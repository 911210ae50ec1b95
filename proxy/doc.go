// Package proxy is knit's service proxy (it replaces kube-proxy). It owns one
// nftables table, "knit-proxy" (family inet, so IPv4 and IPv6 share it), and
// nothing else in the kernel except the conntrack entries of UDP Services it
// deletes when their endpoints go away.
//
// # Data flow
//
//	shared informers (Services, EndpointSlices, this Node)
//	    │  event handlers only convert and record (previous, current)
//	    ▼
//	serviceTracker / endpointTracker   (changes that cancel out are dropped)
//	    │  checkout, at most once per MinSyncPeriod, by ONE sync goroutine
//	    ▼
//	state (all Services, endpoints per port and family, node topology)
//	    │  render: each changed Service → its chains, affinity sets and
//	    │  elements in the shared verdict maps
//	    ▼
//	nftBackend: one knftables.Transaction
//	    partial sync: only what the changed Services' renders changed
//	    full sync (first, every SyncPeriod, after any failure): everything,
//	        chains and maps flushed and refilled inside the transaction
//	        (its elements written to nft straight from the renders, not as
//	        knftables elements: see bulkRunner)
//	    ▼
//	kernel; then health check servers and stale UDP conntrack cleanup
//
// Nothing is applied before the informers have synced, and the table is
// never deleted: a restart replaces its contents in one atomic transaction.
//
// # Packet flow
//
// Lookups go through verdict maps keyed on (address, protocol, port), so a
// new connection costs the same with 10 Services or 10,000:
//
//	prerouting / output (filter, dstnat-10), new connections only
//	  firewall-check: @firewall-ips-vX {LB IP . proto . port : goto firewall-…}
//	      drops sources outside the Service's loadBalancerSourceRanges
//
//	prerouting / output (nat, dstnat)
//	  services:
//	    ClusterIP from outside the cluster CIDRs ─► mark for masquerade
//	    @service-ips-vX      {ip . proto . port : goto <chain>}
//	    @service-nodeports-vX (local, non-loopback daddr) {proto . port : goto external-…}
//	        │
//	        ├─► pick-vX-proto-N                 a port reached only by its ClusterIP,
//	        │       without affinity (most Services): shared by all such ports
//	        │       with N endpoints; DNAT to @endpoints-vX
//	        │       {ClusterIP . proto . port . numgen random mod N : endpoint}
//	        ├─► service-vX-ns/name/proto/port   policy Cluster: random endpoint → DNAT
//	        ├─► local-vX-ns/name/proto/port     policy Local: local endpoints only
//	        └─► external-vX-ns/name/proto/port  ExternalIPs, LoadBalancer IPs, NodePorts:
//	                Cluster: mark for masquerade, goto service-…
//	                Local:   pods and the node itself → service-… (host traffic
//	                         masqueraded); others → local-… (client IP kept)
//	          with sessionAffinity ClientIP: ip saddr @affinity-… → endpoint-…
//	          chain, which refreshes the client in the set (timeout) and DNATs.
//
// Most Services get no chain at all: a ClusterIP-only port without
// affinity is a service-ips element and its endpoints' elements in one
// shared map, chosen from by a pick chain shared by every such port with as
// many endpoints (see renderer.pick). Adding such a Service is a handful of
// elements, and the table has a few dozen chains however many Services
// there are, which is what keeps a change fast: nft loads every chain of
// the table before it applies a transaction, and the kernel re-checks the
// chains reachable from what changed.
//
// The other ports (NodePort, external and LoadBalancer IPs, affinity) have
// chains of their own. A policy chain picks its endpoint with one rule per
// endpoint, rule i matching with probability 1/(n-i) (uniform), up to 32
// endpoints, and with one lookup in a map of its own ("…/endpoints") above.
// Never with an anonymous map per Service, nor one map used by a rule per
// Service: those make the kernel's cost of a 10,000-Service transaction
// quadratic (see policyChain; the shared endpoints map is used by one rule
// per pick chain).
//
// A full sync is two transactions: the first only creates missing objects
// (empty chains, sets and maps: harmless), so that the second, which
// replaces all contents atomically, refers to every object by name.
//
//	input / forward / output (filter), new connections only
//	  service-endpoints-check: @no-endpoint-services-vX → reject (TCP reset,
//	      ICMP unreachable) when a Service has no endpoint at all, drop when
//	      only a Local policy leaves this node without one
//	  nodeport-endpoints-check (input): @no-endpoint-nodeports-vX, same
//	  cluster-ips-check (forward, output): a ClusterIP on an undefined port is
//	      rejected; an address in the service CIDRs that is no Service is dropped
//
//	postrouting (nat, srcnat)
//	  masquerading:
//	    mark set? → clear the mark, masquerade
//	    DNATed to a local endpoint that is also the source → masquerade (hairpin)
//
// The mark is cleared in the same rule that masquerades: a packet that then
// leaves through the VXLAN device is encapsulated with the inner packet's
// mark, and an outer UDP packet still carrying it would be masqueraded a
// second time (kubernetes #88986 and PR #92035: the trigger of the "63
// second delay" checksum bug). The outer packet's own conntrack entry is
// never DNATed, so the hairpin rule cannot match it either.
//
// Endpoints are chosen as kube-proxy chooses them: Ready ones, narrowed by
// topology hints (trafficDistribution PreferSameNode / PreferSameZone) when
// the hints cover this node; Serving-and-Terminating ones only when no
// endpoint is Ready; internalTrafficPolicy / externalTrafficPolicy Local use
// endpoints on this node only. Headless and ExternalName Services get no
// rules. Services whose ClusterIP is in Config.LocalServiceIPs (the cluster
// DNS, answered by knit on every node) get no rules for that ClusterIP.
//
// A new Service whose EndpointSlice has not arrived yet waits for it up to
// Config.NewServiceHoldOff before it is synced, so that a Service and its
// slice cost one sync, not two; changes to existing Services never wait.
//
// Chain and set names are readable: "service-v4-default/web/tcp/http"; an
// unnamed port is "_". They are hashed only if longer than nft allows, which
// Kubernetes' own name limits rule out.
//
// # The iptables backend
//
// For kernels without nftables (--proxy-backend=iptables, or auto when nft
// does not work) the same state is rendered as kube-proxy's iptables mode
// renders it, in chains prefixed KNIT- (flow in iptables_render.go), and
// applied with one iptables-restore --noflush batch per family and sync
// (iptables.go). The variant, iptables-legacy or iptables-nft, is the one
// the node already uses; a node where both hold rules is reported
// (iptables_detect.go). A lookup costs one rule per Service port there, as
// with kube-proxy: the backend exists for compatibility, not for scale.
package proxy
