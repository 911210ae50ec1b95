package lab

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// Underlay topologies (Options.Topology).
//
// TopologyFlat, the default, puts every node on one L2 segment, the knitu0
// bridge (198.18.0.0/24), where direct routing works between all nodes.
//
// TopologyTwoSubnets adds a second underlay, 198.19.0.0/24 on bridge
// knitu1, joined to the first by a router netns, so that nodes on different
// subnets can only reach each other's pods through VXLAN (and the overlay's
// auto mode routes directly within a subnet and through VXLAN across):
//
//	sandbox root: knitu0 198.18.0.254/24 (control plane)   knitu1 (no address)
//	                |     route 198.19.0.0/24 via .253        |
//	    node1, node3, ... 198.18.0.N                       node2, node4, ... 198.19.0.N
//	    (default via .254,                                 (default via 198.19.0.254)
//	     198.19.0.0/24 via 198.18.0.253)                      |
//	                |                                         |
//	                `-- eth0 198.18.0.253  netns router  eth1 198.19.0.254 --'
//	                                       (ip_forward=1)
//
// Odd nodes are on 198.18.0.0/24 and even nodes on 198.19.0.0/24, so that a
// node added later (Cluster.AddNode) lands on a subnet by its index.
const (
	TopologyFlat       = ""
	TopologyTwoSubnets = "two-subnets"
)

// Addresses of the two-subnet topology.
const (
	SecondUnderlayBridge = "knitu1"
	SecondUnderlayCIDR   = "198.19.0.0/24"
	RouterNetns          = "router"
	RouterUnderlayIP     = "198.18.0.253" // the router on knitu0
	RouterSecondIP       = "198.19.0.254" // the router on knitu1: the gateway of even nodes
)

// nodeUnderlay is where node i attaches: its address, the bridge its veth
// joins, its default gateway and any further routes (ip route add args).
type nodeUnderlay struct {
	IP      string
	Bridge  string
	Gateway string
	Routes  [][]string
}

// underlayFor says where node i attaches in the cluster's topology.
func (c *Cluster) underlayFor(i int) nodeUnderlay {
	if c.opts.Topology == TopologyTwoSubnets && i%2 == 0 {
		return nodeUnderlay{IP: fmt.Sprintf("198.19.0.%d", i), Bridge: SecondUnderlayBridge, Gateway: RouterSecondIP}
	}
	u := nodeUnderlay{IP: fmt.Sprintf("198.18.0.%d", i), Bridge: UnderlayBridge, Gateway: UnderlayGateway}
	if c.opts.Topology == TopologyTwoSubnets {
		u.Routes = [][]string{{SecondUnderlayCIDR, "via", RouterUnderlayIP}}
	}
	return u
}

// setupTopology builds what the topology needs besides the nodes. It is
// idempotent within a sandbox: a previous lab's Down removed the router
// netns (with its veths) but left the bridge and the root's route.
func (c *Cluster) setupTopology(ctx context.Context) error {
	switch c.opts.Topology {
	case TopologyFlat:
		return nil
	case TopologyTwoSubnets:
	default:
		return fmt.Errorf("lab: unknown topology %q (want %q or %q)", c.opts.Topology, TopologyFlat, TopologyTwoSubnets)
	}
	var steps [][]string
	if exec.CommandContext(ctx, "ip", "link", "show", SecondUnderlayBridge).Run() != nil {
		steps = append(steps, []string{"link", "add", SecondUnderlayBridge, "type", "bridge"})
	}
	steps = append(steps,
		[]string{"link", "set", SecondUnderlayBridge, "up"},
		[]string{"netns", "add", RouterNetns},
		[]string{"link", "add", "rt-u0", "type", "veth", "peer", "name", "eth0", "netns", RouterNetns},
		[]string{"link", "set", "rt-u0", "master", UnderlayBridge, "up"},
		[]string{"link", "add", "rt-u1", "type", "veth", "peer", "name", "eth1", "netns", RouterNetns},
		[]string{"link", "set", "rt-u1", "master", SecondUnderlayBridge, "up"},
		[]string{"-n", RouterNetns, "link", "set", "lo", "up"},
		[]string{"-n", RouterNetns, "addr", "add", RouterUnderlayIP + "/24", "dev", "eth0"},
		[]string{"-n", RouterNetns, "addr", "add", RouterSecondIP + "/24", "dev", "eth1"},
		[]string{"-n", RouterNetns, "link", "set", "eth0", "up"},
		[]string{"-n", RouterNetns, "link", "set", "eth1", "up"},
		// The control plane (and the upstream DNS) in the sandbox root
		// answers the second subnet through the router.
		[]string{"route", "replace", SecondUnderlayCIDR, "via", RouterUnderlayIP},
	)
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, "ip", s...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	// Forwarding in the router netns only; rp_filter off there so that
	// the host's inherited defaults cannot drop forwarded packets.
	for _, kv := range []string{"net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
		"net.ipv4.conf.eth0.rp_filter=0", "net.ipv4.conf.eth1.rp_filter=0"} {
		if out, err := exec.CommandContext(ctx, "ip", "netns", "exec", RouterNetns, "sysctl", "-qw", kv).CombinedOutput(); err != nil {
			return fmt.Errorf("router sysctl %s: %v: %s", kv, err, out)
		}
	}
	return nil
}

// StartAgentWith starts the node's agent (after StopAgent or KillAgent)
// with extra flags after the lab's own; a flag given again overrides the
// earlier value (e.g. "--overlay-backend=direct"). The next StartAgent goes
// back to the lab's flags.
func (n *Node) StartAgentWith(extra ...string) error {
	cmd, err := n.spawn("agent", append(n.agentArgs(), extra...))
	if err != nil {
		return err
	}
	n.agent = cmd
	return nil
}
