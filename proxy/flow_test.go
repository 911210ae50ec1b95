package proxy

import (
	"net/netip"
	"strings"
	"testing"
)

// Packet-flow tests: every Service shape at once in one table, and the first
// packet of connections from pods on this node (10.42.1.100), pods elsewhere
// (10.42.2.100), this node itself (198.18.0.1) and an outside client
// (203.0.113.9) traced through the rendered rules.
func TestPacketFlows(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	const (
		pod      = "10.42.1.100"
		farPod   = "10.42.2.100"
		host     = nodeIP
		outside  = "203.0.113.9"
		pod6     = "fd42::1:100"
		outside6 = "2001:db8::9"
	)
	runFlowTests(t, h.fake, []flowTest{
		// ClusterIP
		{name: "pod to ClusterIP", src: pod, dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080"},
		{name: "remote pod to ClusterIP", src: farPod, dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080"},
		{name: "outside to ClusterIP is masqueraded", src: outside, dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080", masq: true},
		{name: "node to ClusterIP is masqueraded", src: host, dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080", masq: true},
		{name: "hairpin: endpoint to its own Service", src: "10.42.1.5", dst: "10.43.0.20", port: 80, out: "10.42.1.5:8080, 10.42.2.7:8080", masq: true},
		{name: "one endpoint", src: pod, dst: "10.43.0.21", port: 80, out: "10.42.2.7:8080"},
		{name: "unnamed UDP port", src: pod, proto: "udp", dst: "10.43.0.22", port: 53, out: "10.42.2.8:5353"},
		{name: "wrong protocol on a ClusterIP is rejected", src: pod, proto: "udp", dst: "10.43.0.22", port: 80, out: "REJECT"},
		{name: "undefined port of a ClusterIP is rejected", src: pod, dst: "10.43.0.20", port: 81, out: "REJECT"},
		{name: "unallocated ClusterIP is dropped", src: pod, dst: "10.43.9.9", port: 80, out: "DROP"},
		{name: "SCTP port", src: pod, proto: "sctp", dst: "10.43.0.34", port: 9000, out: "10.42.2.20:9000"},
		{name: "second port", src: pod, dst: "10.43.0.34", port: 80, out: "10.42.2.20:8080"},
		// Node-local DNS: untouched, never rejected or dropped.
		{name: "pod to node-local DNS", src: pod, proto: "udp", dst: "10.43.0.10", port: 53, out: "ACCEPT"},
		{name: "node to node-local DNS", src: host, proto: "udp", dst: "10.43.0.10", port: 53, out: "ACCEPT"},
		{name: "node-local DNS over TCP", src: pod, dst: "10.43.0.10", port: 53, out: "ACCEPT"},
		// No endpoints: refused at once.
		{name: "no endpoints: ClusterIP rejects", src: pod, dst: "10.43.0.23", port: 80, out: "REJECT"},
		{name: "no endpoints: NodePort rejects", src: outside, dst: nodeIP, port: 30023, out: "REJECT"},
		{name: "no endpoints: externalIP rejects", src: outside, dst: "192.0.2.23", port: 80, out: "REJECT"},
		// NodePort, externalIPs
		{name: "NodePort from outside", src: outside, dst: nodeIP, port: 30025, out: "10.42.1.10:8080, 10.42.2.10:8080", masq: true},
		{name: "NodePort from a pod", src: pod, dst: nodeIP, port: 30025, out: "10.42.1.10:8080, 10.42.2.10:8080", masq: true},
		{name: "NodePort from the node", src: host, dst: nodeIP, port: 30025, out: "10.42.1.10:8080, 10.42.2.10:8080", masq: true},
		{name: "unknown NodePort is left alone", src: outside, dst: nodeIP, port: 30999, out: "ACCEPT"},
		{name: "externalIP", src: outside, dst: "192.0.2.26", port: 80, out: "10.42.2.11:8080", masq: true},
		// externalTrafficPolicy Local
		{name: "ETP Local: LB IP from outside keeps the client", src: outside, dst: "192.0.2.27", port: 80, out: "10.42.1.12:8080"},
		{name: "ETP Local: NodePort from outside keeps the client", src: outside, dst: nodeIP, port: 30027, out: "10.42.1.12:8080"},
		{name: "ETP Local: pods short-circuit to all endpoints", src: pod, dst: "192.0.2.27", port: 80, out: "10.42.1.12:8080, 10.42.2.12:8080"},
		{name: "ETP Local: the node short-circuits, masqueraded", src: host, dst: nodeIP, port: 30027, out: "10.42.1.12:8080, 10.42.2.12:8080", masq: true},
		{name: "ETP Local: ClusterIP uses all endpoints", src: pod, dst: "10.43.0.27", port: 80, out: "10.42.1.12:8080, 10.42.2.12:8080"},
		{name: "ETP Local, none here: LB IP drops", src: outside, dst: "192.0.2.28", port: 80, out: "DROP"},
		{name: "ETP Local, none here: NodePort drops", src: outside, dst: nodeIP, port: 30028, out: "DROP"},
		{name: "ETP Local, none here: pods still reach it", src: pod, dst: "192.0.2.28", port: 80, out: "10.42.2.13:8080"},
		// internalTrafficPolicy Local, topology, termination, affinity
		{name: "ITP Local: only the local endpoint", src: pod, dst: "10.43.0.29", port: 80, out: "10.42.1.14:8080"},
		{name: "terminating endpoints when none is ready", src: pod, dst: "10.43.0.31", port: 80, out: "10.42.1.16:8080"},
		{name: "PreferSameZone hints", src: pod, dst: "10.43.0.32", port: 80, out: "10.42.1.17:8080, 10.42.3.17:8080"},
		{name: "PreferSameNode hints", src: pod, dst: "10.43.0.33", port: 80, out: "10.42.1.18:8080"},
		{name: "ClientIP affinity: new client may go anywhere", src: pod, dst: "10.43.0.30", port: 80, out: "10.42.1.15:8080, 10.42.2.15:8080"},
		// IPv6 and dual-stack
		{name: "dual-stack: IPv4 ClusterIP", src: pod, dst: "10.43.0.24", port: 80, out: "10.42.1.9:8080"},
		{name: "dual-stack: IPv6 ClusterIP", src: pod6, dst: "fd43::24", port: 80, out: "[fd42::1:9]:8080, [fd42::2:9]:8080"},
		{name: "dual-stack: IPv6 NodePort from outside", src: outside6, dst: nodeIP6, port: 30024, out: "[fd42::1:9]:8080, [fd42::2:9]:8080", masq: true},
		{name: "dual-stack: IPv6 ClusterIP from outside", src: outside6, dst: "fd43::24", port: 80, out: "[fd42::1:9]:8080, [fd42::2:9]:8080", masq: true},
		{name: "IPv6 unallocated ClusterIP is dropped", src: pod6, dst: "fd43::99", port: 80, out: "DROP"},
		{name: "many endpoints: map", src: pod, dst: "10.43.0.35", port: 80, out: bigOut("10.42.7")},
		{name: "many endpoints with affinity: vmap", src: pod, dst: "10.43.0.36", port: 80, out: bigOut("10.42.8")},
		// loadBalancerSourceRanges
		{name: "source range: allowed client", src: "203.0.113.9", dst: "192.0.2.37", port: 80, out: "10.42.2.21:8080", masq: true},
		{name: "source range: other client dropped", src: "203.0.113.99", dst: "192.0.2.37", port: 80, out: "DROP"},
		{name: "source range: node in range reaches the VIP", src: host, dst: "192.0.2.37", port: 80, out: "10.42.2.21:8080", masq: true},
		{name: "source range: NodePort is not filtered", src: "203.0.113.99", dst: nodeIP, port: 30037, out: "10.42.2.21:8080", masq: true},
		{name: "source range: ClusterIP is not filtered", src: pod, dst: "10.43.0.37", port: 80, out: "10.42.2.21:8080"},
		// Not ours
		{name: "headless: pod IPs are untouched", src: pod, dst: "10.42.2.19", port: 8080, out: "ACCEPT"},
		{name: "plain pod-to-pod traffic", src: pod, dst: farPod, port: 8080, out: "ACCEPT"},
	})
}

// bigOut lists the endpoints of the many-endpoints shape in render order.
func bigOut(prefix string) string {
	var list []endpoint
	for _, e := range eps(inlineEndpointsMax+1, prefix, "") {
		list = append(list, endpoint{addr: netip.MustParseAddr(e.ip), port: 8080})
	}
	sortEndpoints(list)
	var s []string
	for _, e := range list {
		s = append(s, e.hostPort())
	}
	return strings.Join(s, ", ")
}

// TestVXLANNotMasqueradedTwice is the kubernetes #88986 regression: the
// masquerade rule clears the mark, so when the (masqueraded) inner packet is
// encapsulated by the VXLAN device, the outer UDP packet, which inherits the
// inner packet's mark, is not masqueraded a second time.
func TestVXLANNotMasqueradedTwice(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	local := []netip.Addr{netip.MustParseAddr(nodeIP)}
	inner, _ := trace(t, h.fake, local, packet{
		src: netip.MustParseAddr("203.0.113.9"), dst: netip.MustParseAddr(nodeIP), proto: "tcp", dport: 30025,
	})
	if !inner.masq {
		t.Fatalf("inner packet to a NodePort should be masqueraded: %+v", inner)
	}
	if inner.mark != 0 {
		t.Fatalf("mark %#x left on the inner packet after masquerade", inner.mark)
	}
	// The outer packet: this node to another node's VTEP, UDP 8472, with
	// the inner packet's mark, locally generated (output path).
	outer, matched := trace(t, h.fake, local, packet{
		src: netip.MustParseAddr(nodeIP), dst: netip.MustParseAddr("198.18.0.2"), proto: "udp", dport: 8472, mark: inner.mark,
	})
	if outer.masq || outer.out != "ACCEPT" {
		t.Errorf("encapsulated packet touched: %+v, rules: %v", outer, matched)
	}
	// And had the mark not been cleared, the outer packet would have been
	// masqueraded: the test can see the bug.
	buggy, _ := trace(t, h.fake, local, packet{
		src: netip.MustParseAddr(nodeIP), dst: netip.MustParseAddr("198.18.0.2"), proto: "udp", dport: 8472, mark: 0x4000,
	})
	if !buggy.masq {
		t.Errorf("tracer does not model the mark-based masquerade")
	}
}
