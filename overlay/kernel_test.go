package overlay

// Kernel tests: real netlink and nftables in throwaway network namespaces
// inside the knit sandbox (TestMain re-executes the test binary under
// unshare; every test here calls sandbox.Require and skips outside).
//
// Topology (built with ip(8) in the sandbox's root netns):
//
//	 knitu0 198.18.0.254/24 (sandbox bridge)     knitu1 (second underlay bridge)
//	   |            |             |                    |             |
//	 n1 eth0      n2 eth0      router 198.18.0.100  router 198.19.0.100  n3 eth0
//	 198.18.0.1   198.18.0.2                                           198.19.0.3
//	   |            |                                                    |
//	 cni0 10.42.1.1 cni0 10.42.2.1                                     cni0 10.42.3.1
//	   |            |                                                    |
//	 pod 10.42.1.2  pod 10.42.2.2                                      pod 10.42.3.2
//
// plus fd42:0:0:N::/64 pod addresses, and fd00::N on the underlay when a
// test asks for an IPv6 underlay. Each node runs a real Overlay (Run) on
// netlink sockets opened in its netns and nft run in its netns; all
// Overlays share one fake API server, so annotations one publishes are
// what the others program.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/lab/sandbox"
)

func TestMain(m *testing.M) { sandbox.Main(m) }

// run runs a command and fails the test on error.
func run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// try runs a command and reports whether it succeeded.
func try(args ...string) (string, bool) {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	return string(out), err == nil
}

func in(netnsName string, args ...string) []string {
	return append([]string{"ip", "netns", "exec", netnsName}, args...)
}

type labNode struct {
	name     string
	n        int
	underlay []string // node IPs
	ns       string
	pod      string // the pod netns
	o        *Overlay
	reg      *prometheus.Registry
	stop     func()
}

type lab struct {
	t      testing.TB
	client *fake.Clientset
	nodes  map[string]*labNode
	bridge map[string]bool
	// syncPeriod is the agents' timer resync (default 1 s, so that
	// level-triggered repairs show up quickly).
	syncPeriod time.Duration
	// configure, if set, adjusts each agent's Config before it starts.
	configure func(*Config)
}

var labMu sync.Mutex // one topology at a time: names are fixed

func newLab(t testing.TB) *lab {
	t.Helper()
	sandbox.Require(t)
	labMu.Lock()
	l := &lab{t: t, client: fake.NewClientset(), nodes: map[string]*labNode{}, bridge: map[string]bool{}}
	t.Cleanup(func() {
		for _, n := range l.nodes {
			if n.stop != nil {
				n.stop()
			}
			_, _ = try("ip", "netns", "del", n.pod)
			_, _ = try("ip", "netns", "del", n.ns)
			_, _ = try("ip", "link", "del", n.name+"-eth0")
		}
		_, _ = try("ip", "netns", "del", "router")
		_, _ = try("ip", "link", "del", "knitu1")
		_, _ = try("ip", "link", "del", "rt-u0")
		labMu.Unlock()
	})
	return l
}

// addRouter joins 198.18.0.0/24 (knitu0) and 198.19.0.0/24 (knitu1).
func (l *lab) addRouter() {
	t := l.t
	run(t, "ip", "link", "add", "knitu1", "type", "bridge")
	run(t, "ip", "link", "set", "knitu1", "up")
	run(t, "ip", "netns", "add", "router")
	run(t, "ip", "link", "add", "rt-u0", "type", "veth", "peer", "name", "u0", "netns", "router")
	run(t, "ip", "link", "add", "rt-u1", "type", "veth", "peer", "name", "u1", "netns", "router")
	run(t, "ip", "link", "set", "rt-u0", "master", sandbox.UnderlayBridge, "up")
	run(t, "ip", "link", "set", "rt-u1", "master", "knitu1", "up")
	for _, c := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"ip", "addr", "add", "198.18.0.100/24", "dev", "u0"},
		{"ip", "addr", "add", "198.19.0.100/24", "dev", "u1"},
		{"ip", "link", "set", "u0", "up"},
		{"ip", "link", "set", "u1", "up"},
		{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
	} {
		run(t, in("router", c...)...)
	}
}

// addNode builds node n: its netns on an underlay, a cni0 bridge with the
// node's pod gateway addresses, and one pod netns behind it; and creates its
// Node object (podCIDRs and InternalIPs only: the overlay publishes the rest).
func (l *lab) addNode(n int, underlay ...string) *labNode {
	t := l.t
	nd := &labNode{name: fmt.Sprintf("n%d", n), n: n, underlay: underlay}
	nd.ns, nd.pod = nd.name, nd.name+"-pod"
	l.nodes[nd.name] = nd
	bridge, other, router := sandbox.UnderlayBridge, "198.19.0.0/24", "198.18.0.100"
	if strings.HasPrefix(underlay[0], "198.19.") {
		bridge, other, router = "knitu1", "198.18.0.0/24", "198.19.0.100"
	}
	run(t, "ip", "netns", "add", nd.ns)
	run(t, "ip", "link", "add", nd.name+"-eth0", "type", "veth", "peer", "name", "eth0", "netns", nd.ns)
	run(t, "ip", "link", "set", nd.name+"-eth0", "master", bridge, "up")
	cmds := [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"ip", "link", "set", "eth0", "up"},
		{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
		{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
		{"ip", "link", "add", "cni0", "type", "bridge"},
		{"ip", "addr", "add", fmt.Sprintf("10.42.%d.1/24", n), "dev", "cni0"},
		{"ip", "addr", "add", fmt.Sprintf("fd42:0:0:%x::1/64", n), "dev", "cni0", "nodad"},
		{"ip", "link", "set", "cni0", "up"},
		{"ip", "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", nd.pod},
		{"ip", "link", "set", "veth-pod", "master", "cni0", "up"},
	}
	for _, u := range underlay {
		if strings.Contains(u, ":") {
			cmds = append(cmds, []string{"ip", "addr", "add", u + "/64", "dev", "eth0", "nodad"})
		} else {
			cmds = append(cmds, []string{"ip", "addr", "add", u + "/24", "dev", "eth0"},
				[]string{"ip", "route", "add", other, "via", router})
		}
	}
	podMTU := "1450"
	if len(underlay) > 1 {
		podMTU = "1430" // a VXLAN device over IPv6 may carry this node's traffic
	}
	run(t, "ip", "netns", "add", nd.pod)
	for _, c := range cmds {
		run(t, in(nd.ns, c...)...)
	}
	for _, c := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"ip", "addr", "add", fmt.Sprintf("10.42.%d.2/24", n), "dev", "eth0"},
		{"ip", "addr", "add", fmt.Sprintf("fd42:0:0:%x::2/64", n), "dev", "eth0", "nodad"},
		{"ip", "link", "set", "eth0", "mtu", podMTU, "up"},
		{"ip", "route", "add", "default", "via", fmt.Sprintf("10.42.%d.1", n)},
		{"ip", "-6", "route", "add", "default", "via", fmt.Sprintf("fd42:0:0:%x::1", n)},
	} {
		run(t, in(nd.pod, c...)...)
	}

	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: nd.name},
		Spec: corev1.NodeSpec{PodCIDR: fmt.Sprintf("10.42.%d.0/24", n),
			PodCIDRs: []string{fmt.Sprintf("10.42.%d.0/24", n), fmt.Sprintf("fd42:0:0:%x::/64", n)}},
	}
	for _, u := range underlay {
		node.Status.Addresses = append(node.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: u})
	}
	if _, err := l.client.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return nd
}

// nsNFT runs every nft command in one network namespace: exec from a thread
// that ns.Do switched forks a child in that namespace.
type nsNFT struct {
	knftables.Interface
	ns ns.NetNS
}

func (n *nsNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	return n.ns.Do(func(ns.NetNS) error { return n.Interface.Run(ctx, tx) })
}

func (n *nsNFT) ListRules(ctx context.Context, chain string) (rules []*knftables.Rule, err error) {
	derr := n.ns.Do(func(ns.NetNS) error {
		rules, err = n.Interface.ListRules(ctx, chain)
		return nil
	})
	if derr != nil {
		return nil, derr
	}
	return rules, err
}

// start runs an Overlay for the node, in its netns.
func (l *lab) start(nd *labNode, backend Backend) {
	t := l.t
	cfg := testConfig(t, backend)
	cfg.NodeName = nd.name
	cfg.SyncPeriod = time.Second // level-triggered repairs show up quickly
	if l.syncPeriod > 0 {
		cfg.SyncPeriod = l.syncPeriod
	}
	if l.configure != nil {
		l.configure(&cfg)
	}
	nd.reg = prometheus.NewRegistry()
	factory := informers.NewSharedInformerFactory(l.client, 0)
	o, err := New(cfg, Sources{Nodes: factory.Core().V1().Nodes(), Client: l.client}, nd.reg,
		testLogger(nd.name))
	if err != nil {
		t.Fatal(err)
	}
	path := "/run/netns/" + nd.ns
	o.newKernel = func() (kernel, error) {
		h, err := netns.GetFromPath(path)
		if err != nil {
			return nil, err
		}
		defer h.Close()
		return newNetlinkKernelAt(h)
	}
	o.newNFT = func() (knftables.Interface, error) {
		target, err := ns.GetNS(path)
		if err != nil {
			return nil, err
		}
		var nft knftables.Interface
		err = target.Do(func(ns.NetNS) error {
			nft, err = knftables.New(knftables.InetFamily, nftTable)
			return err
		})
		if err != nil {
			return nil, err
		}
		return &nsNFT{Interface: nft, ns: target}, nil
	}
	noIPTables(o) // forward rules have their own kernel test (forward_kernel_test.go)
	nd.o = o
	ctx, cancel := context.WithCancel(context.Background())
	factory.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	nd.stop = sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: Run: %v", nd.name, err)
		}
		factory.Shutdown()
	})
}

// testLogger logs to the test output only when -v.
func testLogger(node string) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, nil)).With("node", node)
	}
	return quietLog()
}

func (l *lab) eventually(what string, timeout time.Duration, cond func() bool) {
	l.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, n := range l.nodes {
				for _, c := range [][]string{{"ip", "-d", "link", "show", "type", "vxlan"}, {"ip", "route"}, {"ip", "-6", "route"},
					{"ip", "neigh", "show", "nud", "permanent"}, {"bridge", "fdb", "show", "dev", deviceV4}} {
					out, _ := try(in(n.ns, c...)...)
					fmt.Fprintf(&b, "--- %s: %s\n%s", n.name, strings.Join(c, " "), out)
				}
			}
			l.t.Fatalf("timed out waiting for %s\n%s", what, b.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ping reports whether from's pod reaches dst (one echo, 1 s), with the DF
// bit set and a packet of the given payload size if size > 0.
func ping(from *labNode, dst string, size int) bool {
	args := []string{"ping", "-c", "1", "-W", "1"}
	if size > 0 {
		args = append(args, "-M", "do", "-s", fmt.Sprint(size))
	}
	_, ok := try(in(from.pod, append(args, dst)...)...)
	return ok
}

func podIP(n int, f family) string {
	if f == v4 {
		return fmt.Sprintf("10.42.%d.2", n)
	}
	return fmt.Sprintf("fd42:0:0:%x::2", n)
}

// changes is the node's knit_overlay_kernel_changes_total, all labels summed.
func changes(nd *labNode) float64 { return metricSum(nd.reg, "knit_overlay_kernel_changes_total") }

// syncs is how many syncs the node ran.
func syncs(nd *labNode) float64 { return metricSum(nd.reg, "knit_overlay_sync_duration_seconds") }

func metricSum(reg *prometheus.Registry, name string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		return -1
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				sum += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum
}

// quiet waits for two more syncs on every node and checks that they changed
// nothing in the kernel.
func (l *lab) quiet() {
	l.t.Helper()
	before := map[string][2]float64{}
	for name, n := range l.nodes {
		if n.o != nil {
			before[name] = [2]float64{syncs(n), changes(n)}
		}
	}
	l.eventually("two more syncs", 10*time.Second, func() bool {
		for name, b := range before {
			l.nodes[name].o.kick() // the timer may be long (syncPeriod)
			if syncs(l.nodes[name]) < b[0]+2 {
				return false
			}
		}
		return true
	})
	for name, b := range before {
		if c := changes(l.nodes[name]); c != b[1] {
			l.t.Errorf("%s: %v netlink changes in syncs that had nothing to do", name, c-b[1])
		}
	}
}

func (l *lab) reaches(from, to *labNode, f family) {
	l.t.Helper()
	l.eventually(fmt.Sprintf("%s pod -> %s pod (%s)", from.name, to.name, f), 10*time.Second, func() bool {
		return ping(from, podIP(to.n, f), 0)
	})
}

// routeDev is the device the node's route to a pod IP goes out on ("" if
// there is none).
func routeDev(t *testing.T, nd *labNode, dst string) string {
	out, _ := try(in(nd.ns, "ip", "route", "get", dst)...)
	f := strings.Fields(out)
	for i := range f {
		if f[i] == "dev" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return ""
}

func TestKernelVXLAN(t *testing.T) {
	for _, tc := range []struct {
		name      string
		underlay6 bool
	}{{"IPv4 underlay, dual-stack pods", false}, {"dual-stack underlay", true}} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			// No timer resync during the test: repairs must come from the
			// kernel's deletion events (watch.go).
			l.syncPeriod = time.Hour
			u := func(n int) []string {
				if tc.underlay6 {
					return []string{fmt.Sprintf("198.18.0.%d", n), fmt.Sprintf("fd00::%d", n)}
				}
				return []string{fmt.Sprintf("198.18.0.%d", n)}
			}
			n1, n2 := l.addNode(1, u(1)...), l.addNode(2, u(2)...)
			l.start(n1, BackendVXLAN)
			l.start(n2, BackendVXLAN)
			l.eventually("ready", 10*time.Second, func() bool { return n1.o.Ready() && n2.o.Ready() })
			for _, f := range families {
				l.reaches(n1, n2, f)
				l.reaches(n2, n1, f)
			}
			if d := routeDev(t, n1, podIP(2, v4)); d != deviceV4 {
				t.Errorf("IPv4 pod route goes via %s, want %s", d, deviceV4)
			}
			want6 := deviceV4
			if tc.underlay6 {
				want6 = deviceV6
			}
			if d := routeDev(t, n1, podIP(2, v6)); d != want6 {
				t.Errorf("IPv6 pod route goes via %s, want %s", d, want6)
			}
			if n1.o.MTU() != 1450 && !tc.underlay6 || tc.underlay6 && n1.o.MTU() != 1430 {
				t.Errorf("MTU() = %d", n1.o.MTU())
			}
			// Full-size packets with DF at the pod MTU pass (no black hole).
			mtu := n1.o.MTU()
			if !ping(n1, podIP(2, v4), mtu-28) || !ping(n1, podIP(2, v6), mtu-48) {
				t.Errorf("DF ping at pod MTU %d failed", mtu)
			}
			tcpTransfer(t, n1, n2, 1<<20)
			// The node itself reaches remote pods (source: its VTEP address).
			if _, ok := try(in(n1.ns, "ping", "-c", "1", "-W", "1", podIP(2, v4))...); !ok {
				t.Error("node n1 cannot reach n2's pod")
			}
			l.quiet()

			// Deleted by hand -> back at once: the deletion event triggers a
			// sync (the timer would take an hour here).
			breakages := []struct {
				what string
				cmd  []string
			}{
				{"route", []string{"ip", "route", "del", "10.42.2.0/24"}},
				{"IPv6 route", []string{"ip", "-6", "route", "del", "fd42:0:0:2::/64"}},
				{"neighbour", []string{"ip", "neigh", "del", "10.42.2.0", "dev", deviceV4}},
				{"FDB entry", []string{"bridge", "fdb", "del", vtepMAC("n2", deviceV4).String(), "dev", deviceV4, "dst", "198.18.0.2"}},
				{"device", []string{"ip", "link", "del", deviceV4}},
				{"device down", []string{"ip", "link", "set", deviceV4, "down"}},
			}
			for _, b := range breakages {
				// Whether a ping right after the breakage fails is a race
				// with the repair; that the repair comes within a second
				// is not.
				before := changes(n1)
				run(t, in(n1.ns, b.cmd...)...)
				l.eventually("repair of the "+b.what, time.Second, func() bool { return changes(n1) > before })
				l.reaches(n1, n2, v4)
				l.reaches(n1, n2, v6)
				l.quiet()
			}
		})
	}
}

// Three nodes in auto mode, n3 behind a router: direct routes on the shared
// subnet, VXLAN across it; a deleted node's entries go; a restarted agent
// changes nothing; the pods' egress is masqueraded, pod-to-pod is not.
func TestKernelAuto(t *testing.T) {
	l := newLab(t)
	l.addRouter()
	n1, n2, n3 := l.addNode(1, "198.18.0.1"), l.addNode(2, "198.18.0.2"), l.addNode(3, "198.19.0.3")
	for _, n := range []*labNode{n1, n2, n3} {
		l.start(n, BackendAuto)
	}
	for _, a := range []*labNode{n1, n2, n3} {
		for _, b := range []*labNode{n1, n2, n3} {
			if a != b {
				l.reaches(a, b, v4)
				l.reaches(a, b, v6)
			}
		}
	}
	for _, c := range []struct {
		from *labNode
		dst  string
		want string
	}{
		{n1, podIP(2, v4), "eth0"},
		{n1, podIP(3, v4), deviceV4},
		{n1, podIP(2, v6), deviceV4}, // IPv6 pods, IPv4 underlay: VXLAN even on one subnet
		{n3, podIP(1, v4), deviceV4},
	} {
		if d := routeDev(t, c.from, c.dst); d != c.want {
			t.Errorf("%s -> %s goes via %s, want %s", c.from.name, c.dst, d, c.want)
		}
	}
	if got := metricSum(n1.reg, "knit_overlay_peers_programmed"); got != 2 {
		t.Errorf("n1 peers programmed = %v", got)
	}
	tcpTransfer(t, n3, n1, 1<<20)

	// The checksum bug's trigger (see ensureDevice) is NAT of the outer
	// VXLAN packet on the sending node. Mark n1's packets to n3's pods as
	// kube-proxy marks those it will masquerade: the mark survives
	// encapsulation onto the outer packet, and still no VXLAN packet n1
	// sends is NATed, by n1's pod traffic, its egress masquerade, or the
	// node itself.
	vxlanNAT := fmt.Sprintf(`table inet knit-test-vxlan-nat {
		chain pre { type filter hook prerouting priority mangle; ip daddr 10.42.3.0/24 meta mark set 0x4000; }
		chain out { type route hook output priority mangle; ip daddr 10.42.3.0/24 meta mark set 0x4000; }
		chain post {
			type filter hook postrouting priority srcnat + 10;
			udp dport %d meta mark 0x4000 counter name marked;
			udp dport %d ct status snat counter name natted;
		}
		counter marked {}
		counter natted {}
	}`, DefaultPort, DefaultPort)
	run(t, in(n1.ns, "nft", vxlanNAT)...)
	tcpTransfer(t, n1, n3, 1<<20)
	if !ping(n1, podIP(3, v4), 0) || !ping(n1, sandbox.ControlPlaneIP, 0) {
		t.Error("n1's pod lost n3's pod or the outside with the mark set")
	}
	if _, ok := try(in(n1.ns, "ping", "-c", "1", "-W", "1", podIP(3, v4))...); !ok {
		t.Error("node n1 cannot reach n3's pod with the mark set")
	}
	counters := run(t, in(n1.ns, "nft", "list", "counters", "table", "inet", "knit-test-vxlan-nat")...)
	if !regexp.MustCompile(`counter marked \{\s*packets [1-9]`).MatchString(counters) {
		t.Errorf("no marked VXLAN packet seen leaving n1 (the test sees nothing):\n%s", counters)
	}
	if !regexp.MustCompile(`counter natted \{\s*packets 0 `).MatchString(counters) {
		t.Errorf("VXLAN packets leaving n1 were NATed:\n%s", counters)
	}
	run(t, in(n1.ns, "nft", "delete", "table", "inet", "knit-test-vxlan-nat")...)
	l.quiet()

	// Masquerade: the sandbox bridge address is "outside the cluster" and
	// has no route back to 10.42.0.0/16, so only a masqueraded ping returns.
	if !ping(n1, sandbox.ControlPlaneIP, 0) {
		t.Error("pod cannot reach an address outside the cluster (masquerade)")
	}
	// Pod to pod keeps the pod's address, over VXLAN and direct routes.
	for _, to := range []*labNode{n2, n3} {
		if src := udpSource(t, n1, to); src != podIP(1, v4) {
			t.Errorf("pod n1 -> pod %s arrives from %s, want %s (never masquerade pod to pod)", to.name, src, podIP(1, v4))
		}
	}

	// A restarted agent finds everything in place.
	n1.stop()
	l.start(n1, BackendAuto)
	l.eventually("n1 ready again", 10*time.Second, n1.o.Ready)
	l.quiet()
	if c := changes(n1); c != 0 {
		t.Errorf("restart made %v netlink changes", c)
	}

	// n3 is deleted: n1 and n2 drop its entries.
	if err := l.client.CoreV1().Nodes().Delete(context.Background(), "n3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	l.eventually("n3's entries gone", 10*time.Second, func() bool {
		for _, n := range []*labNode{n1, n2} {
			routes, _ := try(in(n.ns, "ip", "route")...)
			fdb, _ := try(in(n.ns, "bridge", "fdb", "show", "dev", deviceV4)...)
			if strings.Contains(routes, "10.42.3.0") || strings.Contains(fdb, "198.19.0.3") {
				return false
			}
		}
		return true
	})
}

// A node's IP changes: it re-creates its device (same MAC), republishes,
// and its peers follow.
func TestKernelNodeIPChange(t *testing.T) {
	l := newLab(t)
	n1, n2 := l.addNode(1, "198.18.0.1"), l.addNode(2, "198.18.0.2")
	l.start(n1, BackendVXLAN)
	l.start(n2, BackendVXLAN)
	l.reaches(n1, n2, v4)

	run(t, in(n2.ns, "ip", "addr", "del", "198.18.0.2/24", "dev", "eth0")...)
	run(t, in(n2.ns, "ip", "addr", "add", "198.18.0.22/24", "dev", "eth0")...)
	node, err := l.client.CoreV1().Nodes().Get(context.Background(), "n2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "198.18.0.22"}}
	if _, err := l.client.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	l.eventually("n1's FDB follows", 10*time.Second, func() bool {
		fdb, _ := try(in(n1.ns, "bridge", "fdb", "show", "dev", deviceV4)...)
		return strings.Contains(fdb, "dst 198.18.0.22") && !strings.Contains(fdb, "dst 198.18.0.2 ")
	})
	l.reaches(n1, n2, v4)
	l.reaches(n2, n1, v4)
	l.quiet()
}

// tcpTransfer sends size bytes from a's pod to b's pod over TCP and checks
// they all arrive: full-size segments through the overlay, with the
// device's checksum offload left on.
func tcpTransfer(t *testing.T, a, b *labNode, size int) {
	t.Helper()
	var ln net.Listener
	mustDo(t, ns.WithNetNSPath("/run/netns/"+b.pod, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(podIP(b.n, v4), "0"))
		return err
	}))
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	var conn net.Conn
	mustDo(t, ns.WithNetNSPath("/run/netns/"+a.pod, func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		return err
	}))
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := conn.Write(make([]byte, size)); err != nil {
		t.Errorf("TCP %s -> %s: %v", a.name, b.name, err)
	}
	conn.Close()
	if n := <-got; n != int64(size) {
		t.Errorf("TCP %s -> %s: %d of %d bytes arrived", a.name, b.name, n, size)
	}
}

// udpSource sends a datagram from a's pod to b's pod and returns the source
// address b's pod saw.
func udpSource(t *testing.T, a, b *labNode) string {
	t.Helper()
	var pc net.PacketConn
	mustDo(t, ns.WithNetNSPath("/run/netns/"+b.pod, func(ns.NetNS) error {
		var err error
		pc, err = net.ListenPacket("udp", net.JoinHostPort(podIP(b.n, v4), "0"))
		return err
	}))
	defer pc.Close()
	var c net.Conn
	mustDo(t, ns.WithNetNSPath("/run/netns/"+a.pod, func(ns.NetNS) error {
		var err error
		c, err = net.Dial("udp", pc.LocalAddr().String())
		return err
	}))
	defer c.Close()
	buf := make([]byte, 16)
	for range 10 {
		_, _ = c.Write([]byte("hi"))
		_ = pc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, from, err := pc.ReadFrom(buf); err == nil {
			host, _, _ := net.SplitHostPort(from.String())
			return host
		}
	}
	t.Errorf("UDP %s -> %s: nothing arrived", a.name, b.name)
	return ""
}
