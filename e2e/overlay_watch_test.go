package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
	"knit.dev/knit/overlay"
)

// Helpers for the overlay's "nothing moves" proofs: a watch on the kernel's
// own change notifications in a node's netns, the agent's count of the
// netlink changes it made, and a Node object with no machine behind it
// whose entries the overlay must program and remove.

// kernelWatch records, from the kernel's notifications in one node netns,
// every change to what the overlay owns: links, routes, neighbour and FDB
// entries (ip monitor, bridge monitor) and nftables rules (nft monitor).
type kernelWatch struct {
	node  string
	cmds  []*exec.Cmd
	mu    sync.Mutex
	lines []string
	wg    sync.WaitGroup
}

// watchKernel starts the monitors in n's netns; stop ends them.
func watchKernel(t *testing.T, n *lab.Node) *kernelWatch {
	t.Helper()
	// A young VXLAN device's IPv6 link-local address is still tentative;
	// when duplicate address detection ends the kernel announces it (and
	// its local route): wait for that first.
	if err := eventually(5*time.Second, func() error {
		out, err := n.Exec(context.Background(), "ip", "-6", "addr", "show", "dev", "knit-vx4", "tentative")
		if err == nil && strings.TrimSpace(out) != "" {
			err = fmt.Errorf("tentative: %s", out)
		}
		return err
	}); err != nil {
		t.Fatalf("%s: knit-vx4: %v", n.Name, err)
	}
	w := &kernelWatch{node: n.Name}
	for _, args := range [][]string{
		{"ip", "-o", "monitor", "link", "address", "route", "neigh"},
		{"bridge", "monitor", "fdb"},
		{"nft", "monitor"},
	} {
		cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			w.stop()
			t.Fatalf("%s: %s: %v", n.Name, strings.Join(args, " "), err)
		}
		w.cmds = append(w.cmds, cmd)
		w.wg.Add(1)
		go func(what string, r io.Reader) {
			defer w.wg.Done()
			s := bufio.NewScanner(r)
			for s.Scan() {
				w.mu.Lock()
				w.lines = append(w.lines, what+": "+s.Text())
				w.mu.Unlock()
			}
		}(args[0], out)
	}
	// The monitors subscribe as they start; give them a moment, so that
	// no change right after this returns is missed.
	time.Sleep(300 * time.Millisecond)
	return w
}

// stop ends the monitors and returns the notifications that concern the
// overlay: anything on a knit VXLAN device, a route of knit's protocol
// (75), and a change to knit's nftables table or FORWARD chain. The IPv6
// link-local address of a VXLAN device and its local route are the
// kernel's (addrconf adds them once duplicate address detection is done,
// a second or two after the device appears) and are left out.
func (w *kernelWatch) stop() []string {
	for _, c := range w.cmds {
		_ = c.Process.Kill()
		_ = c.Wait()
	}
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, l := range w.lines {
		if strings.Contains(l, " fe80:") {
			continue
		}
		for _, s := range []string{"knit-vx", "proto 75", "knit-overlay", "KNIT-FORWARD"} {
			if strings.Contains(l, s) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// overlayKernelChanges is the node agent's knit_overlay_kernel_changes_total,
// all label sets summed: the netlink (and FORWARD rule) changes it made.
func overlayKernelChanges(n *lab.Node) (float64, error) {
	m, err := readAgentMetrics(n)
	if err != nil {
		return 0, err
	}
	// The counter has no sample before its first change, so a restarted
	// agent with nothing to do shows none: check the overlay is there.
	if !strings.Contains(m, "\nknit_overlay_sync_duration_seconds_count ") {
		return 0, fmt.Errorf("no knit_overlay_sync_duration_seconds_count in %s/metrics", n.HealthURL())
	}
	sum := 0.0
	for _, l := range strings.Split(m, "\n") {
		if !strings.HasPrefix(l, "knit_overlay_kernel_changes_total") {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %v", l, err)
		}
		sum += v
	}
	return sum, nil
}

// phantomPeer is a Node object as a knit agent on a machine at ip would
// publish it, with no machine behind it: the overlay on every real node
// must program its route, neighbour and FDB entries, and remove them when
// it is deleted. Traffic to it goes nowhere; only the entries are checked.
func phantomPeer(name, podCIDR, ip, mac string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{
			overlay.AnnotationPublicIP: ip,
			overlay.AnnotationVTEPMAC:  mac,
		}},
		Spec:   corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

// peerEntries reports whether the node has the VXLAN route and FDB entry
// for a peer with the given podCIDR, underlay IP and VTEP MAC (want true),
// or has no route to the podCIDR and no FDB entry to the IP (want false).
func peerEntries(ctx context.Context, n *lab.Node, podCIDR, ip, mac string, want bool) error {
	route, err := routeTo(n, podCIDR)
	if err != nil {
		return err
	}
	fdb, err := n.Exec(ctx, "bridge", "fdb", "show", "dev", "knit-vx4")
	if err != nil {
		return fmt.Errorf("bridge fdb: %v: %s", err, fdb)
	}
	hasRoute := strings.Contains(route, "dev knit-vx4") && strings.Contains(route, "proto 75")
	hasFDB := strings.Contains(fdb, mac+" dst "+ip+" ")
	anyFDB := strings.Contains(fdb, " dst "+ip+" ") // whatever the MAC
	switch {
	case want && (!hasRoute || !hasFDB):
		return fmt.Errorf("route %q, FDB entry %s dst %s present: %v", route, mac, ip, hasFDB)
	case !want && (route != "" || anyFDB):
		return fmt.Errorf("still there: route %q, an FDB entry to %s present: %v", route, ip, anyFDB)
	}
	return nil
}
