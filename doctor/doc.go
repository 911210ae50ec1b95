// Package doctor automates the checklist an operator works through when
// "the Service does not work" (`knit doctor`), and gathers the cluster
// view of `knit status`.
//
// It has two halves that meet over the agent's health listener:
//
//	node side (in every agent, Inspector):
//	    GET /debug/service/{namespace}/{name}[?probe=1] -> NodeReport
//	    facts only: the Service as the agent's cache has it, the DNS
//	    answer from the cluster DNS address, the Service's elements and
//	    chains in the proxy's nftables table (Tables), the node's routes,
//	    neighbour and FDB entries towards each endpoint and its device
//	    MTUs (Net), and with probe: TCP connects to the ClusterIP and
//	    every ready endpoint, and Don't-Fragment UDP probes (small, then
//	    full pod MTU) to each endpoint on another node
//
//	CLI side (Run, from a kubeconfig):
//	    API server: the Service, its EndpointSlices, the Nodes, knit's
//	        status Leases (package status), pods and Events when it
//	        needs to explain missing endpoints
//	    agents (Agents, over HTTP): /status and the NodeReport of every
//	        node involved (the nodes probed from, and the endpoints' nodes)
//	    then the checks, in order, stopping at the first that fails:
//	        dns -> service -> endpoints -> agents -> rules -> probes -> overlay
//
// The checks are small functions of the gathered facts (checks.go), so
// they are tested with a fake clientset and canned reports; the node side
// is tested with fake Tables and Net.
//
// Reaching the agents: an agent publishes the address its health listener
// is bound to in its Lease summary. An agent bound to a wildcard address is
// reached on its node's InternalIP; one bound to loopback (the DaemonSet's
// default, 127.0.0.1:9940) only from its own node, so from an operator's
// machine doctor judges such nodes from their Lease alone and skips the
// node-side checks, and says how to run it on the node instead
// (kubectl exec into knit's pod there, which shares the node's network).
package doctor
