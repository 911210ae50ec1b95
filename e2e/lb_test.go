package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/proxy/lb"
)

// lbService is an echo Service of type LoadBalancer on ports port (HTTP),
// port+1 (TCP echo) and port+2 (UDP echo). Not 80: knit's ingress serves
// that on every node address, and a LoadBalancer port on a node address
// takes precedence over a host listener (see package proxy/lb). Each
// Service gets ports of its own: one node address and port carry one
// Service.
func lbService(ns, name, app string, class *string, local bool, port int32) *corev1.Service {
	s := lab.EchoService(ns, name, app)
	s.Spec.Type = corev1.ServiceTypeLoadBalancer
	s.Spec.LoadBalancerClass = class
	for i := range s.Spec.Ports {
		s.Spec.Ports[i].Port = port + int32(i)
	}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	return s
}

// lbIPs is the Service's status.loadBalancer.ingress IPs, sorted and
// joined by spaces.
func lbIPs(ctx context.Context, c *lab.Cluster, ns, name string) (string, *corev1.Service, error) {
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", nil, err
	}
	var ips []string
	for _, i := range svc.Status.LoadBalancer.Ingress {
		ips = append(ips, i.IP)
	}
	slices.Sort(ips)
	return strings.Join(ips, " "), svc, nil
}

// waitLBIPs waits until the Service's LoadBalancer IPs are exactly those
// of the given nodes, and returns how long that took.
func waitLBIPs(t *testing.T, c *lab.Cluster, ns, name string, timeout time.Duration, nodes ...*lab.Node) time.Duration {
	t.Helper()
	want := sortedIPs(nodes)
	start := time.Now()
	var got string
	err := eventually(timeout, func() error {
		var err error
		got, _, err = lbIPs(context.Background(), c, ns, name)
		if err == nil && got != strings.Join(want, " ") {
			err = fmt.Errorf("status.loadBalancer IPs %q", got)
		}
		return err
	})
	if err != nil {
		t.Fatalf("Service %s/%s: want LoadBalancer IPs %q within %v: %v", ns, name, strings.Join(want, " "), timeout, err)
	}
	return time.Since(start)
}

func sortedIPs(nodes []*lab.Node) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.IP)
	}
	slices.Sort(out)
	return out
}

// lbHolder is the node holding the load balancer's Lease.
func lbHolder(ctx context.Context, c *lab.Cluster) (string, error) {
	l, err := c.Client.CoordinationV1().Leases(lb.DefaultLeaseNamespace).Get(ctx, lb.DefaultLeaseName, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "" {
		return "", fmt.Errorf("lease %s has no holder", lb.DefaultLeaseName)
	}
	return *l.Spec.HolderIdentity, nil
}

// TestLoadBalancer covers knit's built-in load balancer end to end:
// LoadBalancer Services of knit's class get node addresses, reachable from
// outside the cluster (the sandbox root); externalTrafficPolicy Local lists
// only nodes with a ready endpoint, keeps the client address and follows
// endpoint moves; a port taken or reserved gets no address; other classes
// are left alone; killing the Lease holder's agent hands the writing over.
func TestLoadBalancer(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "lb-e2e")
	ctx := context.Background()
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	backends := echoPods(t, c, ns, "lbbe", n2.Name, n3.Name)
	backendNames := map[string]bool{}
	for _, p := range backends {
		backendNames[p.Name] = true
	}
	knitClass := new(lb.DefaultClass)
	// Left alone: another class, and no class (the lab's agents run
	// without --lb-default-class). Created first, checked last.
	createService(t, c, lbService(ns, "other", "lbbe", new("example.com/other"), false, 8100))
	createService(t, c, lbService(ns, "noclass", "lbbe", nil, false, 8100))

	t.Run("cluster policy: every node, reachable from outside", func(t *testing.T) {
		const lbPort = 8110
		createService(t, c, lbService(ns, "lbc", "lbbe", knitClass, false, lbPort))
		took := waitLBIPs(t, c, ns, "lbc", 15*time.Second, n1, n2, n3)
		t.Logf("status.loadBalancer written %v after the Service was created", took.Round(time.Millisecond))
		_, svc, _ := lbIPs(ctx, c, ns, "lbc")
		if cond := meta.FindStatusCondition(svc.Status.Conditions, lb.ConditionType); cond == nil || cond.Status != metav1.ConditionTrue {
			t.Errorf("condition %s: %+v", lb.ConditionType, cond)
		}
		for _, n := range c.Nodes {
			var r echo.Reply
			if err := eventually(5*time.Second, func() error {
				var err error
				r, err = httpEcho(outsideNetns, hostport(n.IP, lbPort))
				return err
			}); err != nil || !backendNames[r.Pod] {
				t.Errorf("outside -> %s:%d: %+v %v", n.IP, lbPort, r, err)
			}
		}
		// UDP too, through the same addresses.
		got, err := udpEcho(outsideNetns, hostport(n1.IP, lbPort+2), "ping")
		if err != nil || !strings.HasSuffix(got, " ping") {
			t.Errorf("outside -> %s:%d/udp: %q %v", n1.IP, lbPort+2, got, err)
		}
		// A newer Service on the same ports gets no address: the ports
		// on every node address are lbc's.
		createService(t, c, lbService(ns, "lbdup", "lbbe", knitClass, false, lbPort))
		if err := eventually(10*time.Second, func() error {
			ips, svc, err := lbIPs(ctx, c, ns, "lbdup")
			if err != nil {
				return err
			}
			cond := meta.FindStatusCondition(svc.Status.Conditions, lb.ConditionType)
			if ips != "" || cond == nil || cond.Reason != lb.ReasonPortConflict {
				return fmt.Errorf("IPs %q, condition %+v", ips, cond)
			}
			return nil
		}); err != nil {
			t.Errorf("Service on lbc's ports: %v; want no IPs and reason %s", err, lb.ReasonPortConflict)
		}
		if ips, _, _ := lbIPs(ctx, c, ns, "lbc"); ips != strings.Join(sortedIPs(c.Nodes), " ") {
			t.Errorf("lbc lost addresses to a newer Service: %q", ips)
		}
	})

	t.Run("local policy: only nodes with endpoints, client address kept", func(t *testing.T) {
		const lbPort = 8120
		createService(t, c, lbService(ns, "lbl", "lbbe", knitClass, true, lbPort))
		waitLBIPs(t, c, ns, "lbl", 15*time.Second, n2, n3)
		for _, n := range []*lab.Node{n2, n3} {
			var r echo.Reply
			if err := eventually(5*time.Second, func() error {
				var err error
				r, err = httpEcho(outsideNetns, hostport(n.IP, lbPort))
				return err
			}); err != nil {
				t.Fatalf("outside -> %s:%d: %v", n.IP, lbPort, err)
			}
			if r.Node != n.Name || !strings.HasPrefix(r.Client, lab.UnderlayGateway+":") {
				t.Errorf("via %s: answered by %s on %s, client seen %s; want a pod on %s seeing %s", n.Name, r.Pod, r.Node, r.Client, n.Name, lab.UnderlayGateway)
			}
		}
	})

	t.Run("local policy follows endpoint moves", func(t *testing.T) {
		const lbPort = 8130
		createService(t, c, lbService(ns, "lbm", "mv", knitClass, true, lbPort))
		first := echoPods(t, c, ns, "mv", n1.Name)[0]
		waitLBIPs(t, c, ns, "lbm", 15*time.Second, n1)
		var r echo.Reply
		if err := eventually(5*time.Second, func() error {
			var err error
			r, err = httpEcho(outsideNetns, hostport(n1.IP, lbPort))
			return err
		}); err != nil || r.Pod != first.Name || !strings.HasPrefix(r.Client, lab.UnderlayGateway+":") {
			t.Errorf("outside -> node1: %+v %v; want %s seeing %s", r, err, first.Name, lab.UnderlayGateway)
		}
		// A second endpoint on node3, then the first one goes: the status
		// follows, node1 leaves the list as soon as its endpoint drains.
		p, err := c.Client.CoreV1().Pods(ns).Create(ctx, lab.EchoPod(ns, "mv-2-"+n3.Name, n3.Name, map[string]string{"app": "mv"}), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitPodRunning(ctx, ns, p.Name, true, 90*time.Second); err != nil {
			t.Fatal(err)
		}
		took := waitLBIPs(t, c, ns, "lbm", 15*time.Second, n1, n3)
		t.Logf("node3 listed %v after its endpoint was ready", took.Round(time.Millisecond))
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, first.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		took = waitLBIPs(t, c, ns, "lbm", 15*time.Second, n3)
		t.Logf("node1 unlisted %v after its pod was deleted", took.Round(time.Millisecond))
		if err := eventually(5*time.Second, func() error {
			var err error
			r, err = httpEcho(outsideNetns, hostport(n3.IP, lbPort))
			return err
		}); err != nil || r.Node != n3.Name {
			t.Errorf("outside -> node3 after the move: %+v %v", r, err)
		}
		// node1 is no longer an address of the Service: nothing answers
		// there (that port has no rule and no listener) once node1's proxy
		// has synced the status change (it syncs at most every 100 ms; the
		// deleted pod may still be serving until then).
		if err := eventually(2*time.Second, func() error {
			if r, err := httpEcho(outsideNetns, hostport(n1.IP, lbPort)); err == nil {
				return fmt.Errorf("answered: %+v", r)
			}
			return nil
		}); err != nil {
			t.Errorf("outside -> node1 after the move: %v", err)
		}
	})

	t.Run("reserved port refused", func(t *testing.T) {
		// 22 (SSH) is reserved: taking it on node addresses would cut
		// the nodes off.
		createService(t, c, lbService(ns, "lbssh", "lbbe", knitClass, false, 22))
		if err := eventually(10*time.Second, func() error {
			ips, svc, err := lbIPs(ctx, c, ns, "lbssh")
			if err != nil {
				return err
			}
			cond := meta.FindStatusCondition(svc.Status.Conditions, lb.ConditionType)
			if ips != "" || cond == nil || cond.Reason != lb.ReasonReservedPort {
				return fmt.Errorf("IPs %q, condition %+v", ips, cond)
			}
			return nil
		}); err != nil {
			t.Errorf("Service on port 22: %v; want no IPs and reason %s", err, lb.ReasonReservedPort)
		}
	})

	t.Run("other classes left alone", func(t *testing.T) {
		for _, name := range []string{"other", "noclass"} {
			ips, svc, err := lbIPs(ctx, c, ns, name)
			if err != nil || ips != "" || meta.FindStatusCondition(svc.Status.Conditions, lb.ConditionType) != nil {
				t.Errorf("%s: status %+v (%v); want it untouched", name, svc.Status, err)
			}
		}
	})

	t.Run("one writer; killing it hands over", func(t *testing.T) {
		leaders := 0
		for _, n := range c.Nodes {
			leaders += int(ingMetric(t, n, "knit_lb_leader"))
		}
		if leaders != 1 {
			t.Errorf("%d agents report knit_lb_leader 1, want exactly 1", leaders)
		}
		holder, err := lbHolder(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		old := c.Node(holder)
		if old == nil {
			t.Fatalf("lease holder %q is no lab node", holder)
		}
		old.KillAgent()
		t.Cleanup(func() {
			if old.AgentPID() == 0 {
				if err := old.StartAgent(); err != nil {
					t.Error(err)
					return
				}
			}
			if err := old.WaitAgentReady(context.Background(), time.Minute); err != nil {
				t.Error(err)
			}
		})
		start := time.Now()
		var next string
		if err := eventually(40*time.Second, func() error {
			var err error
			next, err = lbHolder(ctx, c)
			if err == nil && next == holder {
				err = fmt.Errorf("still held by %s", holder)
			}
			return err
		}); err != nil {
			t.Fatalf("after killing %s's agent: %v", holder, err)
		}
		t.Logf("lease passed from %s to %s %v after the kill", holder, next, time.Since(start).Round(100*time.Millisecond))
		// The new writer serves a new Service (status lists every node:
		// the killed agent's node still forwards with the rules it left).
		createService(t, c, lbService(ns, "lbafter", "lbbe", knitClass, false, 8140))
		waitLBIPs(t, c, ns, "lbafter", 15*time.Second, n1, n2, n3)
		if err := old.StartAgent(); err != nil {
			t.Fatal(err)
		}
		if err := old.WaitAgentReady(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		if h, err := lbHolder(ctx, c); err != nil || h != next {
			t.Errorf("after %s came back the lease is held by %q (%v), want %s still", holder, h, err, next)
		}
	})
}
