package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/kubelet"
)

// TestFoundation is the foundation issue's end-to-end check: every node got
// a podCIDR; a pod on each node gets an IP from its node's podCIDR through
// CNI; a Service gets a ClusterIP and its EndpointSlice lists exactly the
// Ready pods; deleting a pod releases its IP.
func TestFoundation(t *testing.T) {
	c := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	clusterCIDR := netip.MustParsePrefix(lab.ClusterCIDR)
	podCIDRs := map[string]netip.Prefix{}
	for _, n := range c.Nodes {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p, err := netip.ParsePrefix(node.Spec.PodCIDR)
		if err != nil || !clusterCIDR.Contains(p.Addr()) || p.Bits() != 24 {
			t.Fatalf("node %s: podCIDR %q is not a /24 of %s", n.Name, node.Spec.PodCIDR, clusterCIDR)
		}
		for other, q := range podCIDRs {
			if q.Overlaps(p) {
				t.Fatalf("podCIDRs of %s and %s overlap: %s, %s", n.Name, other, p, q)
			}
		}
		podCIDRs[n.Name] = p
	}

	const ns = "foundation"
	if err := c.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	var readyIPs []string
	for _, n := range c.Nodes {
		p := lab.EchoPod(ns, "web-"+n.Name, n.Name, map[string]string{"app": "web"})
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// One more pod that is Running but never Ready: it must not be a ready endpoint.
	unready := lab.EchoPod(ns, "web-unready", c.Nodes[0].Name, map[string]string{"app": "web"})
	unready.Annotations = map[string]string{kubelet.AnnotationFailReadiness: "true"}
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, unready, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, lab.EchoService(ns, "web", "web"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ip, err := netip.ParseAddr(svc.Spec.ClusterIP); err != nil || !netip.MustParsePrefix(lab.ServiceCIDR).Contains(ip) {
		t.Fatalf("Service ClusterIP %q is not in %s", svc.Spec.ClusterIP, lab.ServiceCIDR)
	}

	for _, n := range c.Nodes {
		pod, err := c.WaitPodRunning(ctx, ns, "web-"+n.Name, true, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ip := netip.MustParseAddr(pod.Status.PodIP)
		if !podCIDRs[n.Name].Contains(ip) {
			t.Errorf("pod on %s got %s, outside its node's podCIDR %s", n.Name, ip, podCIDRs[n.Name])
		}
		readyIPs = append(readyIPs, pod.Status.PodIP)
	}
	unreadyPod, err := c.WaitPodRunning(ctx, ns, "web-unready", false, time.Minute)
	if err != nil {
		t.Fatal(err)
	}

	slices.Sort(readyIPs)
	var got []string
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err = c.ReadyEndpointIPs(ctx, ns, "web")
		if err != nil {
			return false, nil
		}
		slices.Sort(got)
		return slices.Equal(got, readyIPs), nil
	})
	if err != nil {
		t.Fatalf("ready endpoints of Service web = %v, want exactly the Ready pods %v (unready pod %s)", got, readyIPs, unreadyPod.Status.PodIP)
	}

	// Deleting a pod releases its IP: the node's IPAM no longer holds it.
	victim := c.Nodes[1]
	pod, _ := c.Client.CoreV1().Pods(ns).Get(ctx, "web-"+victim.Name, metav1.GetOptions{})
	ip := pod.Status.PodIP
	if !victim.IPReserved(ip) {
		t.Fatalf("IP %s of a running pod is not reserved in %s's IPAM store", ip, victim.Name)
	}
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitPodGone(ctx, ns, pod.Name, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if victim.IPReserved(ip) {
		t.Errorf("IP %s still reserved on %s after its pod was deleted", ip, victim.Name)
	}
}

// TestAgentEndpoints checks every node agent serves /healthz, /readyz and
// Prometheus /metrics.
func TestAgentEndpoints(t *testing.T) {
	c := cluster(t)
	client := &http.Client{Timeout: 2 * time.Second}
	for _, n := range c.Nodes {
		for path, want := range map[string]string{"/healthz": "ok", "/readyz": "ok", "/metrics": "knit_component_ready"} {
			resp, err := client.Get(n.HealthURL() + path)
			if err != nil {
				t.Fatalf("%s %s: %v", n.Name, path, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.Contains(string(body), want) {
				t.Errorf("%s %s: status %d, body lacks %q:\n%s", n.Name, path, resp.StatusCode, want, firstLines(string(body), 5))
			}
		}
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return fmt.Sprint(strings.Join(lines, "\n"))
}
