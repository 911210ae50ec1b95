// Package lb is knit's built-in load balancer for bare-metal and edge
// clusters, which have no cloud load balancer to give a Service of type
// LoadBalancer its address. It owns exactly one thing: the
// status.loadBalancer.ingress (and one status condition) of the Services it
// serves. The addresses it writes are node addresses, and package proxy
// already programs every LoadBalancer status IP on every node, so traffic to
// a written address reaches the Service through the node's own rules.
//
// # Which Services
//
// Services of type LoadBalancer whose spec.loadBalancerClass is Config.Class
// (default "knit.dev/lb"), and with Config.DefaultClass those with no class
// at all. Services of another class are left alone. Every Service knit
// serves carries the status condition "knit.dev/LoadBalancer"; when a
// Service stops being knit's (its type changed, or the agent's class flags
// did), knit removes the node addresses it wrote and that condition, and
// nothing else. The API server itself clears status.loadBalancer when the
// type stops being LoadBalancer.
//
// # Which nodes
//
// A node can serve when it is Ready, is not being deleted, does not carry
// the label node.kubernetes.io/exclude-from-external-load-balancers, and
// has an InternalIP of one of the Service's IP families.
//
//   - externalTrafficPolicy Cluster: every such node (any node forwards to
//     any endpoint, masquerading the client).
//   - externalTrafficPolicy Local: only such nodes with a ready endpoint of
//     the Service on them. The proxy keeps the client IP for Local Services
//     by sending external traffic only to local endpoints (dropping it on a
//     node without one), so listing only nodes with a local endpoint is what
//     makes every listed address work and keep the client address. When
//     endpoints move, the list follows; when an endpoint starts terminating
//     (Ready false) its node leaves the list while the endpoint drains.
//
// At most Config.MaxNodes nodes are listed per Service (0: all). Every node
// programs every listed address of every Service, so without a cap a cluster
// of N nodes and S LoadBalancer Services would hold N x S map elements per
// node. Within the cap the choice is stable: nodes already listed stay while
// they can serve, and free places go to the nodes with the highest
// rendezvous hash of (Service UID, node name), which spreads Services over
// nodes and moves only the Services that lose a node when one goes away.
//
// # One writer
//
// Every agent runs the controller and keeps its informers synced, but only
// the holder of the coordination.k8s.io Lease Config.LeaseNamespace/
// LeaseName (default kube-system/knit-lb) writes, through client-go's leader
// election, as the ingress status writer does. A new holder re-checks every
// Service at once. Nothing is written before the informers have synced, so
// an agent with an empty cache can never clear good status.
//
//	Services, EndpointSlices, Nodes (shared cache)
//	    │  handlers only wake the writer, on changes that matter (a
//	    │  LoadBalancer Service, a Local one's endpoints, a node's
//	    │  readiness or addresses), and only while this agent holds the Lease
//	    ▼
//	one sync loop (holder only, rate-limited, a pass every ResyncPeriod
//	anyway, again after a failed write)
//	    │  each pass: every Service knit serves, oldest first → choose():
//	    │  eligible nodes, minus addresses whose port another Service holds
//	    ▼
//	merge patch of status.loadBalancer + status.conditions, only where they
//	differ, guarded by the Service's resourceVersion (a stale cache means a
//	conflict, then a retry)
//
// Every pass looks at all of knit's LoadBalancer Services rather than the
// changed ones because they share node addresses: one address, protocol
// and port can carry only one Service. The Services listing a slot keep it
// (the older one, if two list it), free slots go to older Services first,
// and a Service whose port is taken on every eligible node gets no address
// and the condition reason PortConflict.
//
// The patch sends only status: an update of the whole object from the
// cache would also write back the cache's slimmed metadata.
//
// # Ports on node addresses
//
// Because the addresses are the nodes' own, a LoadBalancer Service's ports
// take those ports on the listed node addresses for all traffic to them,
// from outside and from inside the cluster: the proxy's DNAT comes before
// any local socket. A Service on port 80 or 443 hides knit's ingress (or
// any host listener) on the nodes it is listed on. Ports of the nodes' own
// services (Config.ReservedPorts: SSH, etcd, the API server, the kubelet,
// VXLAN, WireGuard, the agent's health port; the agent adds its VXLAN
// port) are never taken: a Service asking for one gets no address and the
// condition reason ReservedPort, so that a Service cannot cut the nodes
// off or break the overlay.
package lb
