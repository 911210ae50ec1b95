package proxy

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// shape is one Service with its slices: the unit of the golden tests.
type shape struct {
	name string
	objs []runtime.Object
}

// shapes covers every Service shape the proxy renders differently.
func shapes() []shape {
	return []shape{
		{"clusterip", []runtime.Object{
			service("ns1", "web", "10.43.0.20"),
			slice("ns1", "web", "web-1", 8080, []ep{{ip: "10.42.1.5", node: thisNode}, {ip: "10.42.2.7", node: otherNode}}),
		}},
		{"clusterip-one-endpoint", []runtime.Object{
			service("ns1", "one", "10.43.0.21"),
			slice("ns1", "one", "one-1", 8080, []ep{{ip: "10.42.2.7", node: otherNode}}),
		}},
		{"clusterip-unnamed-udp", []runtime.Object{
			service("ns1", "dnsish", "10.43.0.22", withPorts(corev1.ServicePort{Port: 53, Protocol: corev1.ProtocolUDP})),
			slice("ns1", "dnsish", "dnsish-1", 5353, []ep{{ip: "10.42.2.8", node: otherNode}},
				withSlicePorts(discoveryv1.EndpointPort{Name: ptr(""), Port: ptr(int32(5353)), Protocol: ptr(corev1.ProtocolUDP)})),
		}},
		{"no-endpoints", []runtime.Object{
			service("ns1", "empty", "10.43.0.23", withNodePort(30023), withExternalIPs("192.0.2.23")),
		}},
		{"dual-stack", []runtime.Object{
			service("ns1", "dual", "10.43.0.24", withClusterIPs("10.43.0.24", "fd43::24"), withNodePort(30024)),
			slice("ns1", "dual", "dual-v4", 8080, []ep{{ip: "10.42.1.9", node: thisNode}}),
			slice("ns1", "dual", "dual-v6", 8080, []ep{{ip: "fd42::1:9", node: thisNode}, {ip: "fd42::2:9", node: otherNode}}),
		}},
		{"nodeport", []runtime.Object{
			service("ns1", "np", "10.43.0.25", withNodePort(30025)),
			slice("ns1", "np", "np-1", 8080, []ep{{ip: "10.42.1.10", node: thisNode}, {ip: "10.42.2.10", node: otherNode}}),
		}},
		{"externalip", []runtime.Object{
			service("ns1", "ext", "10.43.0.26", withExternalIPs("192.0.2.26")),
			slice("ns1", "ext", "ext-1", 8080, []ep{{ip: "10.42.2.11", node: otherNode}}),
		}},
		{"loadbalancer-local", []runtime.Object{
			service("ns1", "lb", "10.43.0.27", withLoadBalancer(30027, 32027, "192.0.2.27"), withETPLocal),
			slice("ns1", "lb", "lb-1", 8080, []ep{{ip: "10.42.1.12", node: thisNode}, {ip: "10.42.2.12", node: otherNode}}),
		}},
		{"loadbalancer-local-none-here", []runtime.Object{
			service("ns1", "lbr", "10.43.0.28", withLoadBalancer(30028, 32028, "192.0.2.28"), withETPLocal),
			slice("ns1", "lbr", "lbr-1", 8080, []ep{{ip: "10.42.2.13", node: otherNode}}),
		}},
		{"loadbalancer-source-ranges", []runtime.Object{
			func() runtime.Object {
				s := service("ns1", "fw", "10.43.0.37", withLoadBalancer(30037, 0, "192.0.2.37"))
				s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/28", " 198.18.0.0/24 "}
				return s
			}(),
			slice("ns1", "fw", "fw-1", 8080, []ep{{ip: "10.42.2.21", node: otherNode}}),
		}},
		{"internal-local", []runtime.Object{
			service("ns1", "itp", "10.43.0.29", withITPLocal),
			slice("ns1", "itp", "itp-1", 8080, []ep{{ip: "10.42.1.14", node: thisNode}, {ip: "10.42.2.14", node: otherNode}}),
		}},
		{"affinity", []runtime.Object{
			service("ns1", "sticky", "10.43.0.30", withAffinity(600)),
			slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.1.15", node: thisNode}, {ip: "10.42.2.15", node: otherNode}}),
		}},
		{"terminating", []runtime.Object{
			service("ns1", "term", "10.43.0.31"),
			slice("ns1", "term", "term-1", 8080, []ep{
				{ip: "10.42.1.16", node: thisNode, terminating: true},
				{ip: "10.42.2.16", node: otherNode, terminating: true, notServing: true},
			}),
		}},
		{"topology-zone", []runtime.Object{
			service("ns1", "zonal", "10.43.0.32"),
			slice("ns1", "zonal", "zonal-1", 8080, []ep{
				{ip: "10.42.1.17", node: thisNode, zones: []string{"zone-a"}},
				{ip: "10.42.2.17", node: otherNode, zones: []string{"zone-b"}},
				{ip: "10.42.3.17", node: "node-c", zones: []string{"zone-a"}},
			}),
		}},
		{"topology-node", []runtime.Object{
			service("ns1", "nodal", "10.43.0.33"),
			slice("ns1", "nodal", "nodal-1", 8080, []ep{
				{ip: "10.42.1.18", node: thisNode, zones: []string{"zone-a"}, nodes: []string{thisNode}},
				{ip: "10.42.2.18", node: otherNode, zones: []string{"zone-a"}, nodes: []string{otherNode}},
			}),
		}},
		{"node-local-dns", []runtime.Object{
			service("kube-system", "dns", "10.43.0.10", withPorts(
				corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
				corev1.ServicePort{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP})),
			slice("kube-system", "dns", "dns-1", 53, []ep{{ip: "10.42.2.2", node: otherNode}}),
		}},
		{"headless-and-externalname", []runtime.Object{
			service("ns1", "headless", corev1.ClusterIPNone),
			slice("ns1", "headless", "headless-1", 8080, []ep{{ip: "10.42.2.19", node: otherNode}}),
			func() runtime.Object {
				s := service("ns1", "extname", "")
				s.Spec.Type = corev1.ServiceTypeExternalName
				s.Spec.ExternalName = "example.com"
				s.Spec.ClusterIPs = nil
				return s
			}(),
		}},
		{"many-endpoints", []runtime.Object{
			// More than inlineEndpointsMax: a map of its own.
			service("ns1", "big", "10.43.0.35"),
			service("ns1", "bigsticky", "10.43.0.36", withAffinity(60)),
			slice("ns1", "big", "big-1", 8080, eps(inlineEndpointsMax+1, "10.42.7", otherNode)),
			slice("ns1", "bigsticky", "bigsticky-1", 8080, eps(inlineEndpointsMax+1, "10.42.8", otherNode)),
		}},
		{"sctp-multiport", []runtime.Object{
			service("ns1", "multi", "10.43.0.34", withPorts(
				corev1.ServicePort{Name: "a", Port: 80, Protocol: corev1.ProtocolTCP},
				corev1.ServicePort{Name: "b", Port: 9000, Protocol: corev1.ProtocolSCTP})),
			slice("ns1", "multi", "multi-1", 0, []ep{{ip: "10.42.2.20", node: otherNode}},
				withSlicePorts(
					discoveryv1.EndpointPort{Name: ptr("a"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)},
					discoveryv1.EndpointPort{Name: ptr("b"), Port: ptr(int32(9000)), Protocol: ptr(corev1.ProtocolSCTP)})),
		}},
	}
}

// allShapes is every shape at once, plus this node's Node object.
func allShapes() []runtime.Object {
	objs := []runtime.Object{node(thisNode, "zone-a", nodeIP, nodeIP6)}
	for _, s := range shapes() {
		objs = append(objs, s.objs...)
	}
	return objs
}
