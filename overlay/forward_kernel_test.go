package overlay

// Kernel test of the FORWARD accept rules: real iptables-legacy and
// iptables-nft in a throwaway "node" netns that routes between two "pod"
// netns, inside the sandbox:
//
//	knitfwd-a (pod 10.42.1.2) -- knitfwd-r (node: forwards, FORWARD DROP) -- knitfwd-b (pod 10.42.2.2:8080)

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"knit.dev/knit/internal/testkit"
	"knit.dev/knit/internal/xtables"
	"knit.dev/knit/lab/sandbox"
)

const (
	fwdNode = "knitfwd-r"
	fwdPodA = "knitfwd-a"
	fwdPodB = "knitfwd-b"
)

func fwdTopology(t *testing.T) {
	t.Helper()
	for _, n := range []string{fwdNode, fwdPodA, fwdPodB} {
		try("ip", "netns", "del", n)
		run(t, "ip", "netns", "add", n)
		t.Cleanup(func() { try("ip", "netns", "del", n) })
	}
	for _, p := range []struct{ pod, veth, node, pod4 string }{
		{fwdPodA, "ra", "10.42.1.1/24", "10.42.1.2/24"},
		{fwdPodB, "rb", "10.42.2.1/24", "10.42.2.2/24"},
	} {
		run(t, "ip", "link", "add", p.veth, "netns", fwdNode, "type", "veth", "peer", "name", "eth0", "netns", p.pod)
		run(t, in(fwdNode, "ip", "addr", "add", p.node, "dev", p.veth)...)
		run(t, in(fwdNode, "ip", "link", "set", p.veth, "up")...)
		run(t, in(p.pod, "ip", "addr", "add", p.pod4, "dev", "eth0")...)
		run(t, in(p.pod, "ip", "link", "set", "eth0", "up")...)
		run(t, in(p.pod, "ip", "link", "set", "lo", "up")...)
		run(t, in(p.pod, "ip", "route", "add", "default", "via", strings.Split(p.node, "/")[0])...)
	}
	run(t, in(fwdNode, "sysctl", "-qw", "net.ipv4.ip_forward=1")...)
}

// fwdListen serves TCP on 10.42.2.2:8080 in pod B.
func fwdListen(t *testing.T) {
	t.Helper()
	b, err := ns.GetNS("/run/netns/" + fwdPodB)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var l net.Listener
	if err := b.Do(func(ns.NetNS) error {
		l, err = net.Listen("tcp", "10.42.2.2:8080")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("ok\n"))
			c.Close()
		}
	}()
}

// fwdConnects reports whether pod A gets an answer from pod B over TCP.
func fwdConnects(t *testing.T) bool {
	t.Helper()
	a, err := ns.GetNS("/run/netns/" + fwdPodA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ok := false
	a.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", "10.42.2.2:8080", 700*time.Millisecond)
		if err != nil {
			return nil
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(time.Second))
		buf := make([]byte, 3)
		n, _ := c.Read(buf)
		ok = string(buf[:n]) == "ok\n"
		return nil
	})
	return ok
}

// inNode runs fn on a thread in the node netns: every iptables and nft
// program the forward rules exec runs there.
func inNode(t *testing.T, fn func()) {
	t.Helper()
	n, err := ns.GetNS("/run/netns/" + fwdNode)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := n.Do(func(ns.NetNS) error { fn(); return nil }); err != nil {
		t.Fatal(err)
	}
}

func saveOf(t *testing.T, prog string) string {
	t.Helper()
	return run(t, in(fwdNode, prog)...)
}

// TestForwardKernel: with FORWARD policy DROP in each installed iptables
// variant, pod-to-pod TCP through the node fails, knit's rules make it
// work, a restart changes nothing, a deleted jump comes back, turning the
// rules off removes them (and the connection fails again), and a native
// nftables forward drop (which knit cannot override) is reported.
func TestForwardKernel(t *testing.T) {
	sandbox.Require(t)
	var variants []string
	for _, v := range []string{xtables.Legacy, xtables.NFT} {
		if xtables.Host.Installed(v) {
			variants = append(variants, v)
		}
	}
	if len(variants) == 0 {
		t.Skip("no iptables-legacy or iptables-nft installed")
	}
	fwdTopology(t)
	fwdListen(t)
	if !fwdConnects(t) {
		t.Fatal("pod A cannot reach pod B even before any DROP policy")
	}
	for _, v := range variants {
		run(t, in(fwdNode, "iptables-"+v, "-P", "FORWARD", "DROP")...)
	}
	if fwdConnects(t) {
		t.Fatal("pod A reaches pod B through FORWARD policy DROP: the test proves nothing")
	}

	cfg := &Config{ForwardRules: true, ForwardMark: 0x4000,
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd42::/56")}}
	ctx := context.Background()
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ops := map[string]int{}
	count := func(op string) { ops[op]++ }
	sync := func(fw *forward, full bool) bool {
		t.Helper()
		var changed bool
		var err error
		inNode(t, func() { changed, err = fw.sync(ctx, cfg, full, count) })
		if err != nil {
			t.Fatalf("sync: %v\n%s", err, logs.String())
		}
		return changed
	}

	fw := newForward(log)
	if !sync(fw, true) {
		t.Fatal("first sync changed nothing")
	}
	for _, v := range variants {
		for _, prog := range []string{"iptables-" + v + "-save", "ip6tables-" + v + "-save"} {
			save := saveOf(t, prog)
			if !strings.Contains(save, `-A FORWARD -m comment --comment "knit overlay forward rules" -j KNIT-FORWARD`) ||
				!strings.Contains(save, "-A KNIT-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED") ||
				strings.Count(save, "-j KNIT-FORWARD") != 1 {
				t.Errorf("%s:\n%s", prog, save)
			}
		}
		if save := saveOf(t, "iptables-"+v+"-save"); !strings.Contains(save, "-A KNIT-FORWARD -s 10.42.0.0/16") ||
			!strings.Contains(save, "-A KNIT-FORWARD -m mark --mark 0x4000/0x4000") {
			t.Errorf("iptables-%s-save:\n%s", v, save)
		}
	}
	if !fwdConnects(t) {
		t.Fatalf("pod A cannot reach pod B with knit's FORWARD rules\n%s", logs.String())
	}

	// A restarted agent: nothing to change, nothing rewritten.
	before := map[string]string{}
	for _, v := range variants {
		before[v] = saveOf(t, "iptables-"+v+"-save")
	}
	writes := ops["chain"] + ops["jump"]
	if sync(newForward(log), true) || ops["chain"]+ops["jump"] != writes {
		t.Errorf("a restart rewrote rules: ops %v", ops)
	}
	for _, v := range variants {
		// Counters aside, the same rules.
		if got := testkit.StripIPTablesCounters(saveOf(t, "iptables-"+v+"-save")); got != testkit.StripIPTablesCounters(before[v]) {
			t.Errorf("iptables-%s changed across a restart:\n%s\nwas:\n%s", v, got, before[v])
		}
	}

	// Someone deletes the jump (a firewall script): the next sync puts it
	// back, once.
	v := variants[len(variants)-1]
	run(t, in(fwdNode, "iptables-"+v, "-D", "FORWARD", "-m", "comment", "--comment", xtables.ForwardJumpComment, "-j", xtables.ForwardChain)...)
	if fwdConnects(t) {
		t.Error("still connected without the jump")
	}
	if !sync(fw, false) {
		t.Error("the deleted jump was not noticed")
	}
	if save := saveOf(t, "iptables-"+v+"-save"); strings.Count(save, "-j KNIT-FORWARD") != 1 {
		t.Errorf("after the repair:\n%s", save)
	}
	if !fwdConnects(t) {
		t.Error("not connected after the repair")
	}

	// A native nftables firewall dropping in its own forward chain: knit's
	// accept cannot override it; it is reported.
	if _, err := exec.LookPath("nft"); err == nil {
		run(t, in(fwdNode, "nft", "add table inet hostfw; add chain inet hostfw fwdrop { type filter hook forward priority 0; policy drop; }")...)
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "g"}, []string{"family", "table", "chain"})
		var drops []nftDrop
		inNode(t, func() { drops = fw.checkNFT(ctx, g) })
		if len(drops) != 1 || drops[0].String() != "inet hostfw fwdrop" || testutil.ToFloat64(g.WithLabelValues("inet", "hostfw", "fwdrop")) != 1 {
			t.Errorf("native drop not reported: %v", drops)
		}
		if fwdConnects(t) {
			t.Error("connected through a native nftables drop: then knit would not need to report it")
		}
		run(t, in(fwdNode, "nft", "delete table inet hostfw")...)
	}

	// Turned off: every variant's chain and jump go.
	cfg.ForwardRules = false
	if !sync(fw, false) {
		t.Error("turning the rules off changed nothing")
	}
	for _, v := range variants {
		for _, prog := range []string{"iptables-" + v + "-save", "ip6tables-" + v + "-save"} {
			if save := saveOf(t, prog); strings.Contains(save, "KNIT-FORWARD") {
				t.Errorf("%s after turning off:\n%s", prog, save)
			}
		}
	}
	if fwdConnects(t) {
		t.Error("connected through FORWARD DROP after the rules were removed")
	}
}
