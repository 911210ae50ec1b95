package node

import (
	"encoding/json"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
)

// desired is the rendered state of the node: the contents of node.json and
// of the conflist, and the settings the kernel steps apply.
type desired struct {
	node     plugin.NodeConfig
	nodeJSON []byte
	conflist []byte
}

// podCIDRs reads a Node's podCIDRs (spec.podCIDRs, or the older single
// spec.podCIDR), masked, in the Node's order (the first is the primary
// family; the plugin allocates one address from each).
func podCIDRs(n *corev1.Node) ([]netip.Prefix, error) {
	raw := n.Spec.PodCIDRs
	if len(raw) == 0 && n.Spec.PodCIDR != "" {
		raw = []string{n.Spec.PodCIDR}
	}
	out := make([]netip.Prefix, 0, len(raw))
	for _, s := range raw {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("podCIDR %q: %v", s, err)
		}
		if p.Masked() != p {
			return nil, fmt.Errorf("podCIDR %q: host bits set", s)
		}
		out = append(out, p)
	}
	return out, nil
}

// render builds the desired state of the node from its Node object and the
// pod MTU. wait is non-empty (and d nil) when something is not known yet;
// err reports a Node or setting the plugin could not use.
func render(cfg *Config, n *corev1.Node, mtu int) (d *desired, wait string, err error) {
	if n == nil {
		return nil, "this node's Node object " + cfg.NodeName, nil
	}
	cidrs, err := podCIDRs(n)
	if err != nil {
		return nil, "", err
	}
	if len(cidrs) == 0 {
		return nil, "a podCIDR on Node " + n.Name + " (is kube-controller-manager allocating node CIDRs?)", nil
	}
	if mtu == 0 {
		return nil, "the pod MTU (the overlay has not found its underlay yet)", nil
	}
	d = &desired{node: plugin.NodeConfig{
		PodCIDRs:     cidrs,
		MTU:          mtu,
		Bridge:       cfg.Bridge,
		ClusterCIDRs: cfg.ClusterCIDRs,
		ServiceCIDRs: cfg.ServiceCIDRs,
		// Hairpin on every bridge port: a pod reaching itself through a
		// Service gets its own packet back through the port it left by.
		Hairpin: true,
	}}
	if err := d.node.Validate(); err != nil {
		return nil, "", fmt.Errorf("node network config: %v", err)
	}
	if d.nodeJSON, err = json.MarshalIndent(&d.node, "", "  "); err != nil {
		return nil, "", err
	}
	d.nodeJSON = append(d.nodeJSON, '\n')
	d.conflist = renderConfList(cfg)
	return d, "", nil
}

// confList is the conflist the agent writes: knit alone, which handles
// hostPorts itself (capability portMappings). runDir and stateDir are
// always spelled out, so that the plugin finds this node's files when they
// are not the defaults (the lab runs several nodes on one filesystem).
// The MTU and podCIDRs are not in it: the plugin reads them from node.json
// on every call, so the conflist only changes with the directories.
type confList struct {
	CNIVersion string     `json:"cniVersion"`
	Name       string     `json:"name"`
	Plugins    []confKnit `json:"plugins"`
}

type confKnit struct {
	Type         string          `json:"type"`
	RunDir       string          `json:"runDir"`
	StateDir     string          `json:"stateDir"`
	Capabilities map[string]bool `json:"capabilities"`
}

func renderConfList(cfg *Config) []byte {
	b, _ := json.MarshalIndent(confList{
		CNIVersion: plugin.ConfListVersion,
		Name:       plugin.NetworkName,
		Plugins: []confKnit{{
			Type:         plugin.PluginType,
			RunDir:       cfg.RunDir,
			StateDir:     cfg.StateDir,
			Capabilities: map[string]bool{"portMappings": true},
		}},
	}, "", "  ")
	return append(b, '\n')
}

// sysctl is one node-level kernel setting pods need.
type sysctl struct {
	path, value string // path under /proc/sys
	// optional settings are skipped when the kernel does not have them
	// (br_netfilter not loaded); loading a module would change the whole
	// machine, not just this node's namespace.
	optional bool
}

// sysctls are the settings for a node with the given podCIDRs, in the
// node's network namespace (/proc/sys/net is per namespace).
//
//   - Forwarding, per family the node has pods of: the node routes pod
//     traffic. IPv6 forwarding is left alone on an IPv4-only node, because
//     turning it on makes the kernel ignore router advertisements
//     (accept_ra=1), and a node that gets its own IPv6 default route by
//     SLAAC would lose it.
//   - bridge-nf-call-iptables/ip6tables: bridged traffic between two pods
//     of this node goes through nftables' ip/ip6 hooks too. Without it the
//     reply of a pod reached through a Service from a pod on the same
//     bridge skips conntrack (it is bridged, not routed), is not
//     un-DNATed, and the client drops it. Optional: present only with
//     br_netfilter.
//   - send_redirects off: after a Service DNAT to a pod on the same bridge
//     the packet leaves by the port it came in on, and the kernel would
//     tell the client (ICMP redirect, rewritten by conntrack to name the
//     Service IP) to send to the endpoint directly, which then drops
//     packets for an address it does not have. The kernel ORs "all" with
//     the device's value, so both must be 0.
func sysctls(bridge string, cidrs []netip.Prefix) []sysctl {
	var v4, v6 bool
	for _, p := range cidrs {
		v4 = v4 || p.Addr().Is4()
		v6 = v6 || p.Addr().Is6()
	}
	var out []sysctl
	if v4 {
		out = append(out,
			sysctl{path: "net/ipv4/ip_forward", value: "1"},
			sysctl{path: "net/ipv4/conf/all/send_redirects", value: "0"},
			sysctl{path: "net/ipv4/conf/" + bridge + "/send_redirects", value: "0"},
			sysctl{path: "net/bridge/bridge-nf-call-iptables", value: "1", optional: true},
		)
	}
	if v6 {
		out = append(out,
			sysctl{path: "net/ipv6/conf/all/forwarding", value: "1"},
			// The bridge's addresses and routes are ours, not a router's.
			sysctl{path: "net/ipv6/conf/" + bridge + "/accept_ra", value: "0"},
			sysctl{path: "net/bridge/bridge-nf-call-ip6tables", value: "1", optional: true},
		)
	}
	return out
}

// ownedGateway reports whether p is a bridge address knit put there: the
// gateway address (with its prefix length) of a prefix inside one of the
// cluster CIDRs or of a podCIDR this node had before.
func ownedGateway(p netip.Prefix, clusterCIDRs, previous []netip.Prefix) bool {
	if p.Addr() != ipam.Gateway(p.Masked()) {
		return false
	}
	for _, c := range clusterCIDRs {
		if c.Bits() <= p.Bits() && c.Contains(p.Addr()) {
			return true
		}
	}
	for _, c := range previous {
		if c == p.Masked() {
			return true
		}
	}
	return false
}
