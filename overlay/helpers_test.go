package overlay

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// testMAC is the VTEP MAC the test peer number n publishes for its device
// on underlay family f.
func testMAC(n int, f family) string { return fmt.Sprintf("02:00:00:00:%02x:%02x", n, 4+2*int(f)) }

// nodeOpt modifies a test Node.
type nodeOpt func(*corev1.Node)

// knitNode is a Node as a knit agent publishes it: podCIDRs, and for each
// given underlay address, public-ip and vtep-mac annotations of its family.
func knitNode(name string, n int, podCIDRs []string, underlay []string, opts ...nodeOpt) *corev1.Node {
	nd := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{}},
		Spec:       corev1.NodeSpec{PodCIDRs: podCIDRs},
	}
	if len(podCIDRs) > 0 {
		nd.Spec.PodCIDR = podCIDRs[0]
	}
	for _, u := range underlay {
		a := netip.MustParseAddr(u)
		f := familyOf(a)
		nd.Annotations[publicIPKeys[f]] = u
		nd.Annotations[vtepMACKeys[f]] = testMAC(n, f)
		nd.Status.Addresses = append(nd.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: u})
	}
	for _, o := range opts {
		o(nd)
	}
	return nd
}

func withAnnotation(k, v string) nodeOpt {
	return func(n *corev1.Node) {
		if v == "" {
			delete(n.Annotations, k)
			return
		}
		n.Annotations[k] = v
	}
}

func withoutAnnotations() nodeOpt {
	return func(n *corev1.Node) { n.Annotations = nil }
}

func withPodCIDRs(c ...string) nodeOpt {
	return func(n *corev1.Node) {
		n.Spec.PodCIDRs = c
		n.Spec.PodCIDR = ""
		if len(c) > 0 {
			n.Spec.PodCIDR = c[0]
		}
	}
}

func testConfig(t testing.TB, backend Backend) Config {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NodeName = "n1"
	cfg.Backend = backend
	cfg.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd42::/56")}
	cfg, err := cfg.normalize()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func lines(s ...string) string { return strings.Join(s, "\n") }
