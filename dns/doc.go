// Package dns is knit's cluster DNS: it replaces CoreDNS and NodeLocal
// DNSCache. Every node answers its own pods' queries from the agent's shared
// informer cache and forwards everything else to the node's resolvers
// through a cache.
//
// # What it owns
//
//   - the cluster zone (default cluster.local), answered per the Kubernetes
//     DNS-Based Service Discovery specification, schema 1.1.0;
//   - the reverse zones of the configured service and cluster CIDRs;
//   - forwarding, with a positive and negative cache, for every other name;
//   - with BindLocalIP, the dummy link knit-dns0 holding the cluster DNS
//     Service IP (package localaddr; lo holds it instead on kernels without
//     the dummy driver, such as the lab's VM).
//
// # How queries reach it
//
// kubelet writes "nameserver 10.43.0.10" into every pod's resolv.conf. That
// Service IP is answered on every node by that node's knit, and the query
// never crosses nodes:
//
//	pod (10.42.1.7) --udp/53 to 10.43.0.10--> veth --> cni0 (pod's gateway)
//	    --> node routing: 10.43.0.10 is a *local* address (knit-dns0, /32)
//	    --> "local 10.43.0.10 dev knit-dns0 table local" --> INPUT
//	    --> knit's socket bound to 10.43.0.10:53 on this same node
//	reply: 10.43.0.10 --> 10.42.1.7 via cni0 (no NAT anywhere)
//
// The rule that steers the traffic is the kernel's local routing table
// entry, which the address on knit-dns0 creates and which is consulted
// before any other route: a packet addressed to a local address is
// delivered to the local stack. The same packet on any other node meets the
// same entry there. For this to hold, knit's service proxy must emit no DNAT
// (and no "no endpoints" reject) for the cluster DNS Service IP, so that the
// packet keeps its destination; the kube-dns Service object still exists so
// that the Service IP stays allocated and kubelet's --cluster-dns is
// unchanged. The link is created idempotently by Run and never removed, so
// DNS keeps working across agent restarts (a restarting agent rebinds its
// socket in milliseconds; the address never leaves). While nothing is
// bound, the restart guard (guard.go, table inet knit-dns) drops queries
// to the address instead of letting the kernel refuse them, so resolvers
// retry rather than fail.
//
// # Data flow
//
//	Service / EndpointSlice / Pod informers (shared, slim)
//	    --event handlers: note changed keys (tracker)-->
//	    one sync goroutine: rebuild the records of each changed Service/Pod,
//	    repack only the names whose records changed, publish them in one
//	    short write-locked batch into the index (name -> packed responses)
//	    --query path: one map lookup, copy, patch ID/flags/case/OPT-->
//	    UDP socket (own read loop) or TCP (miekg/dns server)
//
// Answers are never built by scanning lists at query time: each name's
// responses are packed when its records change, one per record type. A
// cluster-name query or a cache hit does not allocate.
//
// # The query path, in order
//
//  1. Malformed input: shorter than a header or a response: dropped; bad
//     header or question: FORMERR; opcode other than QUERY: NOTIMP; EDNS
//     version above 0: BADVERS; TSIG: REFUSED; class other than IN:
//     REFUSED; AXFR/IXFR: REFUSED; ANY: one synthesized HINFO (RFC 8482),
//     never forwarded. Nothing is ever larger than the client's payload
//     size (512 without EDNS): an answer that does not fit is sent as the
//     bare question with TC set.
//  2. The cluster zone and reverse zones: SERVFAIL until the informers
//     have synced (never NXDOMAIN for a name we may not know yet); then
//     the packed answer, or NODATA / NXDOMAIN with the SOA in the
//     authority section (RFC 2308). Empty non-terminals (a namespace with
//     Services, "_tcp.<svc>...") are NODATA (RFC 8020). ExternalName
//     Services answer their CNAME and chase the target.
//  3. Everything else: the cache, else the upstreams (see forwarder), with
//     the client's EDNS options passed through.
//
// # Records (specification 1.1.0)
//
//   - dns-version.<zone> TXT "1.1.0"
//   - ClusterIP Service: <svc>.<ns>.svc.<zone> A/AAAA per ClusterIP;
//     _<port>._<proto>.<svc>.<ns>.svc.<zone> SRV per named port; PTR per
//     ClusterIP.
//   - Headless Service: A/AAAA per ready endpoint (publishNotReadyAddresses:
//     every endpoint) at the Service name and at <hostname>.<svc>..., the
//     hostname being the endpoint's or its address with dashes
//     (10-42-1-7); SRV per (endpoint, named port) pointing at the hostname
//     name, with the addresses as glue; PTR per endpoint address. No ready
//     endpoint: NXDOMAIN, as the specification asks.
//   - ExternalName Service: CNAME to the external name.
//   - Pods (only with a Pod informer, "verified" mode): <a-b-c-d>.<ns>.pod.<zone>
//     when a Pod in <ns> has that IP.
//
// Cluster records have TTL Config.TTL (5 s, as CoreDNS); negative answers
// too (SOA minimum), and the schema version 28800 s.
package dns
