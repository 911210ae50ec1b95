// Package node is the agent's side of knit's CNI plugin: it prepares this
// node for the plugin and keeps the plugin's IP reservations honest. The
// plugin (package cni/plugin) never talks to the API server; everything it
// knows about the node comes from the files written here.
//
// Data flow (one sync goroutine; event handlers only kick it):
//
//	Node informer (this node: spec.podCIDRs) --+
//	Config.MTU (the overlay's pod MTU, polled) -+--> render: plugin.NodeConfig + conflist
//	                                                    |
//	    1. kernel, in the agent's network namespace:    v
//	       bridge cni0 up, MTU, one gateway address per podCIDR
//	       (plugin.EnsureBridge); forwarding, bridge netfilter,
//	       no ICMP redirects (see sysctls)
//	    2. <RunDir>/cni/node.json           (atomic: temp file, fsync, rename)
//	    3. <BinDir>/knit                    (copy, hard link or symlink; rename)
//	    4. <ConfDir>/10-knit.conflist       (atomic; only after 1-3 succeeded)
//	    -> Ready
//
//	Pod informer (indexed by node) + IPAM store --every ReconcilePeriod-->
//	    reservations whose pod is gone from this node, older than the
//	    grace period, netns gone --> plugin.ReleaseWhere (under the store
//	    lock, hostPort table re-rendered) --> host veth deleted
//
// Every step compares with what is there and changes only what differs, so
// a sync is cheap and idempotent; syncs are rate-limited, retried with
// backoff after a failure and repeated on a timer (level-triggered). Files
// are replaced, never edited in place, so the plugin and the runtime's
// config watcher never read a torn file. Only the conflist's own name, the
// binary's and node.json are ever written: other files in the CNI
// directories are never touched. Nothing is removed when the agent stops:
// pods keep their network and the runtime keeps creating pods while the
// agent restarts.
//
// The conflist appears only once node.json exists, so a runtime that sees
// it never calls a plugin with no subnet; until then STATUS says not ready.
// A reboot clears /run, so node.json goes away while the conflist stays:
// the plugin then asks the runtime to try again later until the agent has
// prepared the node again.
package node
