package lb

import (
	"context"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestParsePortRanges(t *testing.T) {
	for _, tt := range []struct {
		in, want, err string
	}{
		{in: "", want: ""},
		{in: "22/tcp", want: "22/tcp"},
		{in: " 2379-2380/TCP , 8472/udp,9/sctp", want: "2379-2380/tcp,8472/udp,9/sctp"},
		{in: "22", err: "want PORT[-PORT]/PROTO"},
		{in: "22/icmp", err: "unknown protocol"},
		{in: "0/tcp", err: "1-65535"},
		{in: "70000/tcp", err: "1-65535"},
		{in: "9-1/udp", err: "low to high"},
		{in: "a-b/udp", err: "1-65535"},
	} {
		got, err := ParsePortRanges(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParsePortRanges(%q) = %v, %v; want an error containing %q", tt.in, got, err, tt.err)
			}
			continue
		}
		if err != nil || FormatPortRanges(got) != tt.want {
			t.Errorf("ParsePortRanges(%q) = %q, %v; want %q", tt.in, FormatPortRanges(got), err, tt.want)
		}
	}
	// The defaults survive their own flag form.
	if got, err := ParsePortRanges(FormatPortRanges(DefaultReservedPorts())); err != nil || len(got) != len(DefaultReservedPorts()) {
		t.Errorf("defaults round trip: %v, %v", got, err)
	}
}

// TestReservedPort: a Service asking for a reserved port (SSH here) gets no
// address and says why; its other ports do not matter.
func TestReservedPort(t *testing.T) {
	ctx := context.Background()
	ssh := onPort(lbService("ssh", DefaultClass, false), 22)
	ssh.Spec.Ports = append(ssh.Spec.Ports, ssh.Spec.Ports[0])
	ssh.Spec.Ports[0].Port, ssh.Spec.Ports[0].Name = 8022, "alt"
	client := fake.NewClientset(node("n1", "198.18.0.1"), ssh, onPort(lbService("web", DefaultClass, false), 8080))
	startAgent(t, client, "n1", nil)
	waitIPs(t, client, "web", "198.18.0.1")
	eventually(t, "ssh: ReservedPort", func() bool {
		svc, _ := client.CoreV1().Services("default").Get(ctx, "ssh", metav1.GetOptions{})
		c := meta.FindStatusCondition(svc.Status.Conditions, ConditionType)
		return c != nil && c.Reason == ReasonReservedPort && strings.Contains(c.Message, "22/TCP") && len(svc.Status.LoadBalancer.Ingress) == 0
	})
}
