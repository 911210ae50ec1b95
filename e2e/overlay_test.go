package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/lab/sandbox"
)

// The overlay issue's end-to-end proof beyond TestCrossNode (which covers
// the default vxlan backend on the shared lab): the direct backend on one
// underlay, auto mode on two underlay subnets joined by a router (VXLAN
// across the router, direct routes within a subnet), nodes deleted and
// added, and an agent restart under an iperf3 transfer. Each test brings
// up a lab of its own, because the overlay backend is an agent flag.

// TestOverlayDirect: the direct-routing backend on one underlay subnet.
func TestOverlayDirect(t *testing.T) {
	c := ownLab(t, "overlay-direct", lab.Options{Nodes: 2, AgentArgs: []string{"--overlay-backend=direct"}})
	ctx := context.Background()
	n1, n2 := c.Nodes[0], c.Nodes[1]

	// Direct routing: the peer's podCIDR via its node IP on eth0, and no
	// VXLAN device at all.
	for _, pair := range [][2]*lab.Node{{n1, n2}, {n2, n1}} {
		waitRoute(t, pair[0], podCIDR(t, c, pair[1]), "via "+pair[1].IP+" dev eth0")
		if out, err := pair[0].Exec(ctx, "ip", "link", "show", "knit-vx4"); err == nil {
			t.Errorf("direct backend: %s has a VXLAN device:\n%s", pair[0].Name, out)
		}
	}

	ns := namespace(t, c, "overlay-direct")
	pods := echoPods(t, c, ns, "d", n1.Name, n2.Name)
	// No encapsulation: pods get the underlay interface's whole MTU.
	for i, n := range []*lab.Node{n1, n2} {
		if got, want := podMTU(t, pods[i]), underlayMTU(t, n); got != want {
			t.Errorf("pod on %s: MTU %d with the direct backend, want the underlay's %d", n.Name, got, want)
		}
	}
	checkPodPath(t, c, pods[0], pods[1], n1)
	checkPodPath(t, c, pods[1], pods[0], n2)

	// A deleted Node takes its route with it.
	cidr2 := podCIDR(t, c, n2)
	if err := c.Client.CoreV1().Nodes().Delete(ctx, n2.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitNoRoute(t, n1, cidr2)
}

// TestOverlayAutoTwoSubnets: auto mode on two underlay subnets joined by a
// router netns. node1 and node3 share 198.18.0.0/24 (direct routes), node2
// is on 198.19.0.0/24 (VXLAN, the router in between); node4, added during
// the test, joins node2's subnet.
func TestOverlayAutoTwoSubnets(t *testing.T) {
	c := ownLab(t, "overlay-auto", lab.Options{Nodes: 3, Topology: lab.TopologyTwoSubnets,
		AgentArgs: []string{"--overlay-backend=auto"}})
	ctx := context.Background()
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	if n2.IP != "198.19.0.2" {
		t.Fatalf("node2 has IP %s, want 198.19.0.2 (second subnet)", n2.IP)
	}
	cidr := map[string]string{}
	for _, n := range c.Nodes {
		cidr[n.Name] = podCIDR(t, c, n)
	}

	t.Run("routes", func(t *testing.T) {
		// Same subnet: direct. Across the router: VXLAN, with the FDB
		// entry pointing at the peer's underlay address.
		waitRoute(t, n1, cidr[n3.Name], "via "+n3.IP+" dev eth0")
		waitRoute(t, n3, cidr[n1.Name], "via "+n1.IP+" dev eth0")
		for _, pair := range [][2]*lab.Node{{n1, n2}, {n3, n2}, {n2, n1}, {n2, n3}} {
			waitRoute(t, pair[0], cidr[pair[1].Name], "dev knit-vx4")
			if fdb := vxlanFDB(t, pair[0]); !strings.Contains(fdb, "dst "+pair[1].IP+" ") {
				t.Errorf("%s: no FDB entry for %s:\n%s", pair[0].Name, pair[1].IP, fdb)
			}
		}
		if fdb := vxlanFDB(t, n1); strings.Contains(fdb, "dst "+n3.IP+" ") {
			t.Errorf("node1 has an FDB entry for node3, which it reaches directly:\n%s", fdb)
		}
	})

	ns := namespace(t, c, "overlay-auto")
	pods := echoPods(t, c, ns, "a", n1.Name, n2.Name, n3.Name)
	t.Run("pod-to-pod", func(t *testing.T) {
		for i, src := range pods {
			for j, dst := range pods {
				if i != j {
					checkPodPath(t, c, src, dst, c.Nodes[i])
				}
			}
		}
	})

	t.Run("agent-restart-under-iperf3", func(t *testing.T) {
		// node1 -> node2 crosses the router through VXLAN. Both ends'
		// agents restart during the transfer: node1's with SIGTERM (a
		// rollout), node2's with SIGKILL (a crash).
		before := map[string]string{}
		for _, n := range []*lab.Node{n1, n2} {
			before[n.Name] = overlayState(t, n)
		}
		// No flap: the kernel itself reports every change to the
		// overlay's links, routes, neighbour and FDB entries and its
		// nftables rules; there must be none across the restarts.
		watches := map[string]*kernelWatch{}
		for _, n := range []*lab.Node{n1, n2} {
			watches[n.Name] = watchKernel(t, n)
		}
		srv := startIperf3Server(t, pods[1])
		defer srv()
		type result struct {
			out string
			err error
		}
		done := make(chan result, 1)
		go func() {
			out, err := inNetns(ctx, lab.PodNetns(pods[0]), "iperf3", "-c", pods[1].Status.PodIP, "-t", "8", "-i", "0.5", "-J", "--connect-timeout", "3000")
			done <- result{out, err}
		}()
		time.Sleep(1500 * time.Millisecond)
		start := time.Now()
		n1.StopAgent()
		if err := n1.StartAgent(); err != nil {
			t.Fatal(err)
		}
		n2.KillAgent()
		if err := n2.StartAgent(); err != nil {
			t.Fatal(err)
		}
		for _, n := range []*lab.Node{n1, n2} {
			if err := n.WaitAgentReady(ctx, time.Minute); err != nil {
				t.Fatal(err)
			}
		}
		took := time.Since(start)
		r := <-done
		checkIperf3(t, r.out, r.err)
		// The transfer has 6.5 s left when the first agent stops.
		t.Logf("both agents restarted and Ready again %v after the first stop (within the transfer: %v)",
			took.Round(10*time.Millisecond), took < 6500*time.Millisecond)
		for _, n := range []*lab.Node{n1, n2} {
			if after := overlayState(t, n); after != before[n.Name] {
				t.Errorf("%s: overlay kernel state changed across the agent restart\nbefore:\n%s\nafter:\n%s", n.Name, before[n.Name], after)
			}
			// The watch ran from before the first stop to the end of the
			// transfer: the new agents' first syncs (the ones that would
			// flap) ran before they were Ready, and more followed.
			if changed := watches[n.Name].stop(); len(changed) > 0 {
				t.Errorf("%s: the kernel reported %d changes to the overlay's entries across the agent restart:\n%s",
					n.Name, len(changed), strings.Join(changed, "\n"))
			}
			if ch, err := overlayKernelChanges(n); err != nil || ch != 0 {
				t.Errorf("%s: the restarted agent counts %v netlink changes (%v), want 0", n.Name, ch, err)
			}
		}
	})

	var n4 *lab.Node
	var pod4 *corev1.Pod
	t.Run("node-added", func(t *testing.T) {
		var err error
		if n4, err = c.AddNode(ctx, 4); err != nil {
			t.Fatal(err)
		}
		if n4.IP != "198.19.0.4" {
			t.Fatalf("node4 has IP %s, want 198.19.0.4", n4.IP)
		}
		if err := n4.WaitAgentReady(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		cidr[n4.Name] = podCIDR(t, c, n4)
		pod4 = echoPods(t, c, ns, "new", n4.Name)[0]
		waitRoute(t, n2, cidr[n4.Name], "via "+n4.IP+" dev eth0") // same subnet
		waitRoute(t, n1, cidr[n4.Name], "dev knit-vx4")           // across the router
		waitRoute(t, n3, cidr[n4.Name], "dev knit-vx4")
		for i, src := range pods {
			if err := eventually(5*time.Second, func() error {
				r, err := httpEcho(lab.PodNetns(src), hostport(pod4.Status.PodIP, echo.HTTPPort))
				if err == nil && r.Pod != pod4.Name {
					err = fmt.Errorf("answered by %s", r.Pod)
				}
				return err
			}); err != nil {
				t.Errorf("pod on %s -> pod on the new node4: %v", c.Nodes[i].Name, err)
				continue
			}
			checkPodPath(t, c, src, pod4, c.Nodes[i])
			checkPodPath(t, c, pod4, src, n4)
		}
	})

	t.Run("node-deleted", func(t *testing.T) {
		if n4 == nil {
			t.Skip("node4 was not added")
		}
		// node4's agent and kubelet keep running: only the Node object
		// goes, and a live agent must not bring it back.
		if err := c.Client.CoreV1().Nodes().Delete(ctx, n4.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		vtep := strings.TrimSuffix(cidr[n4.Name], "/24")
		for _, n := range []*lab.Node{n1, n2, n3} {
			waitNoRoute(t, n, cidr[n4.Name])
			if err := eventually(5*time.Second, func() error {
				if fdb := vxlanFDB(t, n); strings.Contains(fdb, "dst "+n4.IP+" ") {
					return fmt.Errorf("FDB entry for %s still there:\n%s", n4.IP, fdb)
				}
				if out, _ := n.Exec(ctx, "ip", "neigh", "show", "dev", "knit-vx4"); strings.Contains(out, vtep+" ") {
					return fmt.Errorf("neighbour entry %s still there:\n%s", vtep, out)
				}
				return nil
			}); err != nil {
				t.Errorf("%s after node4's Node was deleted: %v", n.Name, err)
			}
		}
		// The others still reach each other.
		checkPodPath(t, c, pods[0], pods[1], n1)
		if _, err := c.Client.CoreV1().Nodes().Get(ctx, n4.Name, metav1.GetOptions{}); err == nil {
			t.Errorf("node4's Node object came back after it was deleted")
		}
	})
}

// ownLab brings up a lab for one test, with its own work dir, and takes it
// down when the test ends. Only one lab runs in a sandbox at a time (they
// share the underlay addresses, the node netns names and the control
// plane's ports), so the shared lab of cluster(t) is taken down first if it
// is up; the next test that calls cluster(t) brings it up again.
func ownLab(t *testing.T, name string, opts lab.Options) *lab.Cluster {
	t.Helper()
	if os.Getenv("KNIT_SKIP_E2E") == "1" {
		t.Skip("KNIT_SKIP_E2E=1")
	}
	if !sandbox.InSandbox() {
		t.Fatal("end-to-end tests must run inside the sandbox")
	}
	if labCluster != nil {
		t.Log("taking the shared lab down: one lab at a time per sandbox")
		labCluster.Down()
		labOnce, labCluster, labErr = sync.Once{}, nil, nil
	}
	cache, err := lab.CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	opts.WorkDir = filepath.Join(cache, "lab", "e2e-"+name)
	if opts.CNI == "" {
		opts.CNI = os.Getenv("KNIT_LAB_CNI")
	}
	opts.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	start := time.Now()
	c, err := lab.Up(context.Background(), opts)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(c.Down)
	t.Logf("lab %s up in %v (work dir %s)", name, time.Since(start).Round(100*time.Millisecond), opts.WorkDir)
	return c
}

// checkPodPath checks the overlay issue's path properties from pod src to
// pod dst on another node: TCP (source address kept), UDP, the node of
// src reaching dst, a 64 KiB TCP transfer and a DF ping at the pod MTU.
func checkPodPath(t *testing.T, c *lab.Cluster, src, dst *corev1.Pod, srcNode *lab.Node) {
	t.Helper()
	ctx := context.Background()
	what := fmt.Sprintf("%s (%s) -> %s (%s)", src.Name, src.Spec.NodeName, dst.Name, dst.Spec.NodeName)
	r, err := httpEcho(lab.PodNetns(src), hostport(dst.Status.PodIP, echo.HTTPPort))
	switch {
	case err != nil || r.Pod != dst.Name:
		t.Errorf("TCP %s: %+v, %v", what, r, err)
	case !strings.HasPrefix(r.Client, src.Status.PodIP+":"):
		t.Errorf("TCP %s was masqueraded: the server saw %s", what, r.Client)
	}
	if got, err := udpEcho(lab.PodNetns(src), hostport(dst.Status.PodIP, echo.UDPPort), "hello"); err != nil || got != dst.Name+" hello" {
		t.Errorf("UDP %s: %q, %v", what, got, err)
	}
	if r, err := httpEcho(srcNode.Netns(), hostport(dst.Status.PodIP, echo.HTTPPort)); err != nil || r.Pod != dst.Name {
		t.Errorf("node %s -> remote pod %s: %+v, %v", srcNode.Name, dst.Name, r, err)
	}
	if err := bigTransfer(ctx, lab.PodNetns(src), hostport(dst.Status.PodIP, echo.TCPPort), 64<<10); err != nil {
		t.Errorf("64 KiB TCP %s: %v", what, err)
	}
	mtu := podMTU(t, src)
	if out, err := inNetns(ctx, lab.PodNetns(src), "ping", "-c", "1", "-W", "2", "-M", "do", "-s", itoa(mtu-28), dst.Status.PodIP); err != nil {
		t.Errorf("DF ping of %d bytes (pod MTU %d) %s: %v\n%s", mtu-28, mtu, what, err, out)
	}
}

// podCIDR is the node's IPv4 podCIDR.
func podCIDR(t *testing.T, c *lab.Cluster, n *lab.Node) string {
	t.Helper()
	node, err := c.Client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if node.Spec.PodCIDR == "" {
		t.Fatalf("%s has no podCIDR", n.Name)
	}
	return node.Spec.PodCIDR
}

// routeTo is the node's route to dst ("" if none), as ip route prints it.
func routeTo(n *lab.Node, dst string) (string, error) {
	out, err := n.Exec(context.Background(), "ip", "route", "show", "exact", dst)
	return strings.TrimSpace(out), err
}

// waitRoute waits until the node routes dst in the way described by want
// (a substring of ip route's line, e.g. "dev knit-vx4").
func waitRoute(t *testing.T, n *lab.Node, dst, want string) {
	t.Helper()
	var got string
	if err := eventually(10*time.Second, func() error {
		var err error
		if got, err = routeTo(n, dst); err != nil {
			return err
		}
		if !strings.Contains(got, want) || !strings.Contains(got, "proto 75") {
			return fmt.Errorf("route %q", got)
		}
		return nil
	}); err != nil {
		t.Errorf("%s: route to %s is %q, want one with %q (proto 75)", n.Name, dst, got, want)
	}
}

// waitNoRoute waits until the node has no route to dst.
func waitNoRoute(t *testing.T, n *lab.Node, dst string) {
	t.Helper()
	var got string
	if err := eventually(10*time.Second, func() error {
		var err error
		if got, err = routeTo(n, dst); err != nil {
			return err
		}
		if got != "" {
			return fmt.Errorf("route %q", got)
		}
		return nil
	}); err != nil {
		t.Errorf("%s: route to %s still there: %q", n.Name, dst, got)
	}
}

// vxlanFDB is the FDB of the node's knit-vx4 ("" if it has none).
func vxlanFDB(t *testing.T, n *lab.Node) string {
	t.Helper()
	out, err := n.Exec(context.Background(), "bridge", "fdb", "show", "dev", "knit-vx4")
	if err != nil {
		t.Logf("%s: bridge fdb show dev knit-vx4: %v: %s", n.Name, err, out)
		return ""
	}
	return out
}

// overlayState is what the overlay programs on a node, with the VXLAN
// device's ifindex, to compare across a restart.
func overlayState(t *testing.T, n *lab.Node) string {
	t.Helper()
	s, err := overlayStateErr(n)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// overlayStateErr is overlayState for callers that must not stop the test
// (during an API server outage, say).
func overlayStateErr(n *lab.Node) (string, error) {
	ctx := context.Background()
	var b strings.Builder
	for _, cmd := range [][]string{
		{"ip", "-o", "link", "show", "knit-vx4"},
		{"ip", "route", "show", "proto", "75"},
		{"ip", "neigh", "show", "dev", "knit-vx4"},
		{"bridge", "fdb", "show", "dev", "knit-vx4"},
	} {
		out, err := n.Exec(ctx, cmd...)
		if err != nil {
			return "", fmt.Errorf("%s: %s: %v: %s", n.Name, strings.Join(cmd, " "), err, out)
		}
		if cmd[1] == "-o" {
			// "7: knit-vx4: <...> mtu 1450 ... state UNKNOWN ..." keep the
			// index and name, not the state counters.
			out = strings.Join(strings.Fields(out)[:2], " ") + "\n"
		}
		// The kernel dumps neighbours in hash table order, which changes
		// as other entries come and go: compare sets, not orders.
		lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
		sort.Strings(lines)
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	return b.String(), nil
}

// startIperf3Server runs an iperf3 server in the pod's netns until the
// returned stop is called.
func startIperf3Server(t *testing.T, p *corev1.Pod) (stop func()) {
	t.Helper()
	name := strings.TrimPrefix(lab.PodNetns(p), "/run/netns/")
	cmd := exec.Command("ip", "netns", "exec", name, "iperf3", "-s")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop = func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }
	if err := eventually(5*time.Second, func() error {
		out, err := inNetns(context.Background(), name, "ss", "-Hltn", "sport", "=", ":5201")
		if err == nil && !strings.Contains(out, "5201") {
			err = fmt.Errorf("not listening")
		}
		return err
	}); err != nil {
		stop()
		t.Fatalf("iperf3 server in %s: %v", p.Name, err)
	}
	return stop
}

// checkIperf3 fails the test if the iperf3 client's JSON report shows an
// error or an interval with nothing transferred (a stall).
func checkIperf3(t *testing.T, out string, err error) {
	t.Helper()
	var rep struct {
		Error     string `json:"error"`
		Intervals []struct {
			Sum struct {
				Start, End    float64
				Bytes         int64
				BitsPerSecond float64 `json:"bits_per_second"`
				Retransmits   int
			} `json:"sum"`
		} `json:"intervals"`
		End struct {
			SumReceived struct {
				Bytes         int64
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
			SumSent struct {
				Retransmits int
			} `json:"sum_sent"`
		} `json:"end"`
	}
	if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil {
		t.Fatalf("iperf3 client: %v, output not JSON (%v):\n%s", err, jerr, out)
	}
	if err != nil || rep.Error != "" {
		t.Fatalf("iperf3 transfer failed: %v %s", err, rep.Error)
	}
	minRate := -1.0
	for _, iv := range rep.Intervals {
		if iv.Sum.End-iv.Sum.Start < 0.1 {
			continue // iperf3's last, partial interval
		}
		if iv.Sum.Bytes == 0 {
			t.Errorf("iperf3: nothing transferred in %.1f-%.1f s (a stall)", iv.Sum.Start, iv.Sum.End)
		}
		if minRate < 0 || iv.Sum.BitsPerSecond < minRate {
			minRate = iv.Sum.BitsPerSecond
		}
	}
	if len(rep.Intervals) < 15 {
		t.Errorf("iperf3: %d intervals of 0.5 s, want 16 for -t 8", len(rep.Intervals))
	}
	t.Logf("iperf3: %.2f Gbit/s received, %d MiB, lowest 0.5 s interval %.2f Gbit/s, %d retransmits",
		rep.End.SumReceived.BitsPerSecond/1e9, rep.End.SumReceived.Bytes>>20, minRate/1e9, rep.End.SumSent.Retransmits)
}
