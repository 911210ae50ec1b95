// Package overlay owns cross-node pod connectivity: the VXLAN devices
// knit-vx4/knit-vx6, their FDB and neighbour entries, the routes to every
// peer's podCIDR (tagged "proto 75"), the nftables table knit-overlay
// (egress masquerade), the iptables chain KNIT-FORWARD with its jump from
// FORWARD (forward.go), and this node's overlay.knit.dev/* annotations.
//
// Data flow (one way, level-triggered):
//
//	Node informer --(handler: drop heartbeat-only updates)--> trigger (coalesced)
//	rtnetlink: one of knit's routes/neighbours/FDB entries/devices deleted --^
//	    (watch.go: someone else's deletion is repaired at once, not at the timer)
//	    --> sync loop (at most every 100 ms, full resync every SyncPeriod,
//	        backoff after a failure):
//	          localNode (own podCIDRs, node IP -> underlay link, MTU)
//	          render(every Node)       pure: desired devices/FDB/neigh/routes
//	          reconciler.apply         dump kernel, diff, change only what differs
//	          masq.sync                one nftables transaction, if the chain differs
//	          fwd.sync                 KNIT-FORWARD accept rules, if missing or different
//	          publish <- annotations   separate goroutine patches our own Node
//
// What a peer with podCIDR 10.42.2.0/24, node IP 198.19.0.2 and VTEP MAC m
// turns into on this node (the flannel scheme: the first address of each
// podCIDR is that node's VTEP address, held as a /32 on its VXLAN device):
//
//	VXLAN:  bridge fdb: m dev knit-vx4 dst 198.19.0.2 self permanent
//	        ip neigh:   10.42.2.0 dev knit-vx4 lladdr m PERMANENT
//	        ip route:   10.42.2.0/24 via 10.42.2.0 dev knit-vx4 onlink proto 75
//	direct: ip route:   10.42.2.0/24 via 198.18.0.2 dev eth0 proto 75
//
// and a pod packet to 10.42.2.7 travels:
//
//	pod -> cni0 -> route 10.42.2.0/24 -> knit-vx4 (dst MAC m from the neighbour
//	entry) -> FDB: m is at 198.19.0.2 -> UDP 8472 over the underlay -> peer's
//	knit-vx4 -> peer's cni0 -> pod
//
// Why no per-object change tracker (STYLE 1): the overlay's whole desired
// state is one route and at most one FDB and neighbour entry per node, and
// every sync dumps the kernel anyway to catch entries someone else removed.
// Rendering it from the lister is a linear pass over the Nodes; tracking
// previous/current per Node would save nothing. What the handler does
// instead is drop the updates that matter to no one here (kubelet status
// heartbeats: at 5,000 nodes, hundreds per second), so syncs follow real
// changes only.
//
// The device is named after the underlay (outer) family and carries pod
// traffic of both families, so IPv6 pods work over an IPv4 underlay. Peers
// publish overlay.knit.dev/public-ip(-v6) and vtep-mac(-v6) on their own Node
// objects; a peer whose data is missing or malformed is skipped (logged once,
// knit_overlay_peers_skipped_total{reason}), never half-programmed.
//
// A host firewall whose FORWARD policy is DROP (Docker's, hardening
// guides') would drop every packet the node forwards for its pods: pod to
// pod across nodes, egress, Service traffic DNATed to a pod elsewhere. An
// accept in knit's own nftables table cannot override another base
// chain's drop at the same hook, so the accept goes into the iptables
// filter FORWARD chain itself, as flannel's FLANNEL-FWD and kube-proxy's
// KUBE-FORWARD do: chain KNIT-FORWARD (from and to the cluster CIDRs, the
// proxy's masquerade mark, replies) and a jump at the top of FORWARD, in
// each iptables variant in use (internal/xtables) and each family the
// cluster has (Config.ForwardRules, --overlay-forward-rules). A native
// nftables forward chain with policy drop is beyond reach: it is reported
// (log, knit_overlay_forward_blocked, status for knit doctor).
//
// Nothing is torn down when Run returns: an agent restart, or an API server
// outage (the informer cache keeps its last state), leaves traffic flowing,
// and the first sync after a restart finds nothing to change.
package overlay
