package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
)

// TestPodNetworkOnOneNode covers the CNI issue's end-to-end checks: pods on
// one node reach each other and the node; a pod reaches itself through its
// own address; the IP in pod status is the one on the pod's interface.
func TestPodNetworkOnOneNode(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "cni-e2e")
	node := c.Nodes[0]
	pods := echoPods(t, c, ns, "local", node.Name, node.Name)
	a, b := pods[0], pods[1]
	ctx := context.Background()

	for _, p := range pods {
		out, err := inNetns(ctx, lab.PodNetns(p), "ip", "-o", "addr", "show", "dev", "eth0")
		if err != nil {
			t.Fatalf("%s: %v: %s", p.Name, err, out)
		}
		if !strings.Contains(out, " "+p.Status.PodIP+"/") {
			t.Errorf("pod %s status IP %s is not on its eth0: %s", p.Name, p.Status.PodIP, out)
		}
	}
	if r, err := httpEcho(lab.PodNetns(a), hostport(b.Status.PodIP, echo.HTTPPort)); err != nil || r.Pod != b.Name {
		t.Errorf("pod %s -> pod %s on the same node: %+v, %v", a.Name, b.Name, r, err)
	} else if !strings.HasPrefix(r.Client, a.Status.PodIP+":") {
		t.Errorf("same-node pod traffic was rewritten: %s saw client %s, want %s", b.Name, r.Client, a.Status.PodIP)
	}
	if r, err := httpEcho(lab.PodNetns(a), hostport(a.Status.PodIP, echo.HTTPPort)); err != nil || r.Pod != a.Name {
		t.Errorf("pod %s -> itself: %+v, %v", a.Name, r, err)
	}
	// Hairpin: a pod reaches itself through a Service whose only endpoint
	// it is.
	self := lab.EchoService(ns, "self", "local")
	self.Spec.Selector = map[string]string{"statefulset.kubernetes.io/pod-name": a.Name}
	p, err := c.Client.CoreV1().Pods(ns).Get(ctx, a.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Labels["statefulset.kubernetes.io/pod-name"] = a.Name
	if _, err := c.Client.CoreV1().Pods(ns).Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	self, err = c.Client.CoreV1().Services(ns).Create(ctx, self, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitEndpoints(t, c, ns, "self", 1)
	if err := eventually(5*time.Second, func() error {
		r, err := httpEcho(lab.PodNetns(a), hostport(self.Spec.ClusterIP, 80))
		if err == nil && r.Pod != a.Name {
			err = fmt.Errorf("answered by %s", r.Pod)
		}
		return err
	}); err != nil {
		t.Errorf("hairpin: pod %s -> its own Service %s: %v", a.Name, self.Spec.ClusterIP, err)
	}
	// Pod -> its node: the agent's health port on the node IP.
	resp, err := lab.HTTPClientFrom(lab.PodNetns(a), 3*time.Second).Get(node.HealthURL() + "/healthz")
	if err != nil {
		t.Errorf("pod -> node %s: %v", node.Name, err)
	} else {
		resp.Body.Close()
	}
	// Node -> pod.
	if r, err := httpEcho(node.Netns(), hostport(a.Status.PodIP, echo.HTTPPort)); err != nil || r.Pod != a.Name {
		t.Errorf("node %s -> pod %s: %+v, %v", node.Name, a.Name, r, err)
	}
}

// TestCrossNode covers the overlay issue's end-to-end checks for the
// default backend: pod to pod across nodes over TCP and UDP, node to remote
// pod, a 64 KiB TCP transfer, and a DF ping at the pod MTU.
func TestCrossNode(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "overlay-e2e")
	var names []string
	for _, n := range c.Nodes {
		names = append(names, n.Name)
	}
	pods := echoPods(t, c, ns, "x", names...)
	src := pods[0]
	ctx := context.Background()
	// The pod MTU is the overlay's: the underlay interface's (the one
	// holding the node IP) less 50 bytes of VXLAN over IPv4, handed to the
	// CNI plugin.
	for _, p := range pods {
		n := c.Node(p.Spec.NodeName)
		underlay := underlayMTU(t, n)
		if got := podMTU(t, p); got != underlay-50 {
			t.Errorf("pod %s on %s has MTU %d, want %d (underlay eth0 %d less 50)", p.Name, n.Name, got, underlay-50, underlay)
		}
	}
	for _, dst := range pods[1:] {
		r, err := httpEcho(lab.PodNetns(src), hostport(dst.Status.PodIP, echo.HTTPPort))
		if err != nil || r.Pod != dst.Name {
			t.Errorf("TCP pod %s (%s) -> pod %s (%s): %+v, %v", src.Name, src.Spec.NodeName, dst.Name, dst.Spec.NodeName, r, err)
			continue
		}
		if !strings.HasPrefix(r.Client, src.Status.PodIP+":") {
			t.Errorf("pod-to-pod traffic across nodes was masqueraded: %s saw %s, want %s", dst.Name, r.Client, src.Status.PodIP)
		}
		if got, err := udpEcho(lab.PodNetns(src), hostport(dst.Status.PodIP, echo.UDPPort), "hello"); err != nil || got != dst.Name+" hello" {
			t.Errorf("UDP pod %s -> pod %s: %q, %v", src.Name, dst.Name, got, err)
		}
		// A node reaches a pod on another node.
		if r, err := httpEcho(c.Nodes[0].Netns(), hostport(dst.Status.PodIP, echo.HTTPPort)); err != nil || r.Pod != dst.Name {
			t.Errorf("node %s -> remote pod %s: %+v, %v", c.Nodes[0].Name, dst.Name, r, err)
		}
		// 64 KiB through the TCP echo: no MTU black hole for full-size segments.
		if err := bigTransfer(ctx, lab.PodNetns(src), hostport(dst.Status.PodIP, echo.TCPPort), 64<<10); err != nil {
			t.Errorf("64 KiB TCP %s -> %s: %v", src.Name, dst.Name, err)
		}
		// A ping with DF set, as large as the pod MTU allows.
		mtu := podMTU(t, src)
		out, err := inNetns(ctx, lab.PodNetns(src), "ping", "-c", "1", "-W", "2", "-M", "do", "-s", itoa(mtu-28), dst.Status.PodIP)
		if err != nil {
			t.Errorf("DF ping of %d bytes (MTU %d) %s -> %s: %v\n%s", mtu-28, mtu, src.Name, dst.Name, err, out)
		}
	}
}

func bigTransfer(ctx context.Context, netns, addr string, size int) error {
	conn, err := lab.DialFrom(ctx, netns, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	data := make([]byte, size)
	_, _ = rand.Read(data)
	errc := make(chan error, 1)
	go func() { _, err := conn.Write(data); errc <- err }()
	got := make([]byte, size)
	if _, err := io.ReadFull(conn, got); err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return err
	}
	if !bytes.Equal(got, data) {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// podMTU reads the MTU of the pod's eth0.
func podMTU(t *testing.T, p *corev1.Pod) int {
	t.Helper()
	out, err := inNetns(context.Background(), lab.PodNetns(p), "ip", "-o", "link", "show", "dev", "eth0")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return mtuField(t, out)
}

// underlayMTU reads the MTU of the node's underlay interface (eth0 in its
// netns, the one holding the node IP).
func underlayMTU(t *testing.T, n *lab.Node) int {
	t.Helper()
	out, err := n.Exec(context.Background(), "ip", "-o", "link", "show", "dev", "eth0")
	if err != nil {
		t.Fatalf("%s: %v: %s", n.Name, err, out)
	}
	return mtuField(t, out)
}

// mtuField is the MTU in a line of `ip -o link show`.
func mtuField(t *testing.T, out string) int {
	t.Helper()
	f := strings.Fields(out)
	for i := range f[:len(f)-1] {
		if f[i] == "mtu" {
			if n, err := strconv.Atoi(f[i+1]); err == nil {
				return n
			}
		}
	}
	t.Fatalf("no mtu in %q", out)
	return 0
}

func itoa(n int) string { return strconv.Itoa(n) }
