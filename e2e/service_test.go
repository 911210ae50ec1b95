package e2e

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
)

// TestServices covers the proxy issue's end-to-end checks: ClusterIP from a
// pod and from a node on every node; UDP through a ClusterIP; NodePort from
// another node and from outside the cluster (the sandbox root); session
// affinity; externalTrafficPolicy Local; a Service without endpoints
// refuses at once.
func TestServices(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "svc-e2e")
	ctx := context.Background()
	// Two backends, on node2 and node3; clients on every node.
	backends := echoPods(t, c, ns, "be", c.Nodes[1].Name, c.Nodes[2].Name)
	clients := echoPods(t, c, ns, "client", c.Nodes[0].Name, c.Nodes[1].Name, c.Nodes[2].Name)
	backendNames := map[string]bool{}
	for _, p := range backends {
		backendNames[p.Name] = true
	}

	svc := lab.EchoService(ns, "be", "be")
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitEndpoints(t, c, ns, "be", 2)
	vip := svc.Spec.ClusterIP

	t.Run("ClusterIP from pods and nodes", func(t *testing.T) {
		for _, from := range clients {
			if err := eventually(5*time.Second, func() error {
				r, err := httpEcho(lab.PodNetns(from), hostport(vip, 80))
				if err == nil && !backendNames[r.Pod] {
					err = errors.New("answered by non-backend " + r.Pod)
				}
				return err
			}); err != nil {
				t.Errorf("pod %s on %s -> %s:80: %v", from.Name, from.Spec.NodeName, vip, err)
			}
		}
		for _, n := range c.Nodes {
			if r, err := httpEcho(n.Netns(), hostport(vip, 80)); err != nil || !backendNames[r.Pod] {
				t.Errorf("node %s -> %s:80: %+v %v", n.Name, vip, r, err)
			}
		}
	})

	t.Run("both endpoints used", func(t *testing.T) {
		seen := map[string]bool{}
		for i := 0; i < 40 && len(seen) < 2; i++ {
			if r, err := httpEcho(lab.PodNetns(clients[0]), hostport(vip, 80)); err == nil {
				seen[r.Pod] = true
			}
		}
		if len(seen) != 2 {
			t.Errorf("40 connections reached only %v", seen)
		}
	})

	t.Run("UDP ClusterIP", func(t *testing.T) {
		got, err := udpEcho(lab.PodNetns(clients[0]), hostport(vip, 9001), "ping")
		if err != nil || !strings.HasSuffix(got, " ping") || !backendNames[strings.Fields(got)[0]] {
			t.Errorf("UDP via %s:9001: %q %v", vip, got, err)
		}
	})

	t.Run("NodePort", func(t *testing.T) {
		var np int32
		for _, p := range svc.Spec.Ports {
			if p.Name == "http" {
				np = p.NodePort
			}
		}
		// From outside the cluster: the sandbox root is an outside client.
		for _, n := range c.Nodes {
			r, err := httpEcho("/proc/self/ns/net", hostport(n.IP, int(np)))
			if err != nil || !backendNames[r.Pod] {
				t.Errorf("outside -> %s:%d: %+v %v", n.IP, np, r, err)
			}
		}
		// From another node.
		if r, err := httpEcho(c.Nodes[0].Netns(), hostport(c.Nodes[1].IP, int(np))); err != nil || !backendNames[r.Pod] {
			t.Errorf("node1 -> node2:%d: %+v %v", np, r, err)
		}
	})

	t.Run("session affinity", func(t *testing.T) {
		s := lab.EchoService(ns, "sticky", "be")
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		s, err := c.Client.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		waitEndpoints(t, c, ns, "sticky", 2)
		var first string
		if err := eventually(5*time.Second, func() error {
			r, err := httpEcho(lab.PodNetns(clients[0]), hostport(s.Spec.ClusterIP, 80))
			first = r.Pod
			return err
		}); err != nil {
			t.Fatal(err)
		}
		for range 10 {
			r, err := httpEcho(lab.PodNetns(clients[0]), hostport(s.Spec.ClusterIP, 80))
			if err != nil || r.Pod != first {
				t.Fatalf("affinity broken: first %s, then %s (%v)", first, r.Pod, err)
			}
		}
	})

	t.Run("externalTrafficPolicy Local", func(t *testing.T) {
		s := lab.EchoService(ns, "local", "be")
		s.Spec.Type = corev1.ServiceTypeNodePort
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		s, err := c.Client.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		waitEndpoints(t, c, ns, "local", 2)
		np := int(s.Spec.Ports[0].NodePort)
		// node2 has a local endpoint: the echo sees the outside client's
		// own address (198.18.0.254), not a node's.
		var r echo.Reply
		if err := eventually(5*time.Second, func() error {
			r, err = httpEcho("/proc/self/ns/net", hostport(c.Nodes[1].IP, np))
			return err
		}); err != nil {
			t.Fatalf("outside -> node2:%d (local endpoint): %v", np, err)
		}
		if r.Node != c.Nodes[1].Name || !strings.HasPrefix(r.Client, lab.UnderlayGateway+":") {
			t.Errorf("eTP Local via node2: answered by %s on %s, client seen %s; want node2 and client %s", r.Pod, r.Node, r.Client, lab.UnderlayGateway)
		}
		// node1 has no local endpoint: dropped, not forwarded.
		if r, err := httpEcho("/proc/self/ns/net", hostport(c.Nodes[0].IP, np)); err == nil {
			t.Errorf("eTP Local via node1 (no local endpoint) answered by %s on %s", r.Pod, r.Node)
		}
	})

	t.Run("no endpoints rejects at once", func(t *testing.T) {
		s := lab.EchoService(ns, "empty", "nothing-matches")
		s, err := c.Client.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // let every node program it
		start := time.Now()
		conn, err := lab.DialFrom(ctx, lab.PodNetns(clients[0]), "tcp", hostport(s.Spec.ClusterIP, 80))
		if err == nil {
			conn.Close()
			t.Fatal("connection to a Service without endpoints succeeded")
		}
		if took := time.Since(start); took > 500*time.Millisecond || !isRefused(err) {
			t.Errorf("want an immediate refusal, got %v after %v", err, took)
		}
	})
}

func isRefused(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && (errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH))
}
