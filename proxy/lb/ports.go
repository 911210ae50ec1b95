package lb

import (
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// PortRange is a protocol and an inclusive range of ports.
type PortRange struct {
	Protocol corev1.Protocol
	From, To int32
}

func (r PortRange) String() string {
	p := strings.ToLower(string(r.Protocol))
	if r.From == r.To {
		return fmt.Sprintf("%d/%s", r.From, p)
	}
	return fmt.Sprintf("%d-%d/%s", r.From, r.To, p)
}

func (r PortRange) contains(proto corev1.Protocol, port int32) bool {
	return r.Protocol == proto && port >= r.From && port <= r.To
}

// DefaultReservedPorts are the ports of the nodes' own services. A
// LoadBalancer Service's ports take their port on every listed node
// address, from everywhere (the proxy's DNAT comes first), so one on
// these would cut the nodes off from SSH, the API server and etcd, the
// kubelet, or break the overlay (VXLAN) for the whole cluster. The agent
// adds the overlay's own VXLAN port when it differs.
func DefaultReservedPorts() []PortRange {
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	return []PortRange{
		{tcp, 22, 22},       // SSH
		{tcp, 2379, 2380},   // etcd
		{tcp, 6443, 6443},   // kube-apiserver
		{tcp, 10250, 10250}, // kubelet
		{tcp, 10256, 10256}, // kube-proxy health (load balancers probe it)
		{udp, 4789, 4789},   // VXLAN (IANA)
		{udp, 8472, 8472},   // VXLAN (Linux, flannel, knit)
		{udp, 51820, 51821}, // WireGuard
		{tcp, 9940, 9940},   // knit agent health and metrics
	}
}

// FormatPortRanges is the flag form of ranges: "22/tcp,2379-2380/tcp".
func FormatPortRanges(rs []PortRange) string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return strings.Join(out, ",")
}

// ParsePortRanges reads the flag form: comma-separated PORT[-PORT]/PROTO
// with PROTO tcp, udp or sctp.
func ParsePortRanges(s string) ([]PortRange, error) {
	var out []PortRange
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		ports, proto, ok := strings.Cut(f, "/")
		if !ok {
			return nil, fmt.Errorf("port range %q: want PORT[-PORT]/PROTO", f)
		}
		r := PortRange{Protocol: corev1.Protocol(strings.ToUpper(proto))}
		switch r.Protocol {
		case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
		default:
			return nil, fmt.Errorf("port range %q: unknown protocol %q (want tcp, udp or sctp)", f, proto)
		}
		from, to, isRange := strings.Cut(ports, "-")
		if !isRange {
			to = from
		}
		a, err1 := strconv.ParseUint(from, 10, 16)
		b, err2 := strconv.ParseUint(to, 10, 16)
		if err1 != nil || err2 != nil || a == 0 || a > b {
			return nil, fmt.Errorf("port range %q: want ports 1-65535, low to high", f)
		}
		r.From, r.To = int32(a), int32(b)
		out = append(out, r)
	}
	return out, nil
}

// reservedPort returns the first port of svc in a reserved range.
func reservedPort(svc *corev1.Service, reserved []PortRange) (string, bool) {
	for _, p := range svc.Spec.Ports {
		proto := p.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		for _, r := range reserved {
			if r.contains(proto, p.Port) {
				return fmt.Sprintf("port %d/%s is reserved for the nodes' own services (%s)", p.Port, proto, r), true
			}
		}
	}
	return "", false
}

// reservedPlan is the status of a Service that asks for a reserved port:
// no address at all, and the reason.
func reservedPlan(svc *corev1.Service, why string) plan {
	return plan{cond: metav1.Condition{
		Type: ConditionType, Status: metav1.ConditionFalse, Reason: ReasonReservedPort,
		Message: why + "; knit serves no address for this Service", ObservedGeneration: svc.Generation,
	}}
}
