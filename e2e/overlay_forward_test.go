package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
)

// forwardPolicy sets the filter FORWARD policy of both iptables variants
// and both families inside every node's netns (never the root namespace).
func forwardPolicy(t *testing.T, c *lab.Cluster, policy string) {
	t.Helper()
	for _, n := range c.Nodes {
		for _, prog := range []string{"iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft"} {
			if out, err := n.Exec(context.Background(), prog, "-P", "FORWARD", policy); err != nil {
				t.Errorf("%s: %s -P FORWARD %s: %v: %s", n.Name, prog, policy, err, out)
			}
		}
	}
}

// restartAgents restarts every node's agent with extra flags (none: the
// lab's own) and waits until all are Ready.
func restartAgents(t *testing.T, c *lab.Cluster, extra ...string) {
	t.Helper()
	for _, n := range c.Nodes {
		n.StopAgent()
		// With no extra flags, StartAgentWith is StartAgent.
		if err := n.StartAgentWith(extra...); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range c.Nodes {
		if err := n.WaitAgentReady(context.Background(), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOverlayForwardDrop: nodes whose firewall FORWARD policy is DROP (as
// Docker sets it), in both iptables variants. With the overlay's forward
// rules off, pod-to-pod TCP across nodes and a ClusterIP served by a pod
// on another node fail (the test can fail); with them on (the default),
// both work, and a restart of an agent with nothing to change writes no
// iptables rule. The nodes' policy and the agents' flags are restored at
// the end, so the tests sharing the lab are unaffected.
func TestOverlayForwardDrop(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	ns := namespace(t, c, "fwd-drop")
	client := echoPods(t, c, ns, "fwdcli", c.Nodes[0].Name)[0]
	servers := echoPods(t, c, ns, "fwdsrv", c.Nodes[1].Name, c.Nodes[2].Name)
	svc := createService(t, c, lab.EchoService(ns, "fwdsrv", "fwdsrv"))
	waitEndpoints(t, c, ns, "fwdsrv", 2)

	podToPod := func() error {
		r, err := httpEcho(lab.PodNetns(client), hostport(servers[0].Status.PodIP, echo.HTTPPort))
		if err == nil && r.Pod != servers[0].Name {
			t.Errorf("pod to pod answered by %s", r.Pod)
		}
		return err
	}
	clusterIP := func() error {
		_, err := httpEcho(lab.PodNetns(client), hostport(svc.Spec.ClusterIP, 80))
		return err
	}
	if err := eventually(10*time.Second, podToPod); err != nil {
		t.Fatalf("pod to pod before the test: %v", err)
	}
	if err := eventually(10*time.Second, clusterIP); err != nil {
		t.Fatalf("ClusterIP before the test: %v", err)
	}

	flagged := false
	t.Cleanup(func() {
		forwardPolicy(t, c, "ACCEPT")
		if flagged {
			restartAgents(t, c)
		}
	})

	// The rules off (they are removed at the agents' first sync), then
	// the DROP policy: both paths must fail, or the test proves nothing.
	flagged = true
	restartAgents(t, c, "--overlay-forward-rules=false")
	for _, n := range c.Nodes {
		if out, _ := n.Exec(ctx, "iptables-nft-save"); strings.Contains(out, "KNIT-FORWARD") {
			t.Errorf("%s: KNIT-FORWARD left with --overlay-forward-rules=false:\n%s", n.Name, out)
		}
	}
	forwardPolicy(t, c, "DROP")
	if err := podToPod(); err == nil {
		t.Error("pod to pod across nodes works through FORWARD DROP without knit's rules: the test proves nothing")
	}
	if err := clusterIP(); err == nil {
		t.Error("ClusterIP to a pod on another node works through FORWARD DROP without knit's rules: the test proves nothing")
	}

	// The lab's flags: the rules are on by default.
	restartAgents(t, c)
	flagged = false
	if err := eventually(10*time.Second, podToPod); err != nil {
		t.Errorf("pod to pod across nodes with FORWARD DROP and knit's rules: %v", err)
	}
	if err := eventually(10*time.Second, clusterIP); err != nil {
		t.Errorf("ClusterIP to a pod on another node with FORWARD DROP and knit's rules: %v", err)
	}
	for i := range 20 {
		if err := podToPod(); err != nil {
			t.Errorf("request %d: %v", i, err)
		}
		if err := clusterIP(); err != nil {
			t.Errorf("ClusterIP request %d: %v", i, err)
		}
	}
	for _, n := range c.Nodes {
		for _, prog := range []string{"iptables-legacy", "iptables-nft"} {
			out, err := n.Exec(ctx, prog, "-S", "FORWARD")
			// The jump is at the top unless the proxy's iptables backend
			// (KNIT_LAB_PROXY_BACKEND) inserted its own above it.
			if err != nil || !strings.Contains(out, "-P FORWARD DROP\n") ||
				!strings.Contains(out, "-A FORWARD -m comment --comment \"knit overlay forward rules\" -j KNIT-FORWARD\n") ||
				strings.Count(out, "-j KNIT-FORWARD") != 1 {
				t.Errorf("%s: %s -S FORWARD: %v\n%s", n.Name, prog, err, out)
			}
		}
	}

	// An agent restart with nothing changed: no iptables change at all.
	n := c.Nodes[0]
	n.StopAgent()
	if err := n.StartAgent(); err != nil {
		t.Fatal(err)
	}
	if err := n.WaitAgentReady(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	if m := agentMetrics(t, n); strings.Contains(m, `object="iptables-forward"`) {
		var lines []string
		for _, l := range strings.Split(m, "\n") {
			if strings.Contains(l, "iptables-forward") {
				lines = append(lines, l)
			}
		}
		t.Errorf("%s: a restart with nothing changed changed iptables:\n%s", n.Name, strings.Join(lines, "\n"))
	}
	if err := eventually(10*time.Second, clusterIP); err != nil {
		t.Errorf("ClusterIP after the restart: %v", err)
	}
}
