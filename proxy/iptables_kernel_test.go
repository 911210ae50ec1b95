package proxy

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"knit.dev/knit/internal/testkit"
	"knit.dev/knit/lab/sandbox"
)

// realIPT opens the real iptables of one variant in the sandbox, as the
// agent would with --proxy-backend=iptables-<variant>, and removes knit's
// rules when the test ends (so that the next test starts clean).
func realIPT(t testing.TB, variant string) *iptBackend {
	t.Helper()
	sandbox.Require(t)
	if _, err := exec.LookPath("iptables-" + variant + "-restore"); err != nil {
		t.Skipf("iptables-%s not installed", variant)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	b, err := newIPTables(BackendIPTables+"-"+variant, log)
	if err != nil {
		t.Fatalf("iptables-%s: %v", variant, err)
	}
	removeAll := func() {
		for f, x := range b.fam {
			if err := x.(*iptExec).removeAll(context.Background()); err != nil {
				t.Errorf("removing knit's %s rules: %v", f, err)
			}
		}
	}
	removeAll() // leftovers of an earlier, failed test
	t.Cleanup(removeAll)
	return b
}

// iptSaveText is the variant's iptables-save output (family f).
func iptSaveText(t *testing.T, b *iptBackend, f family) string {
	t.Helper()
	out, err := exec.Command(b.detect.Tools(f == v6).Save).Output()
	if err != nil {
		t.Fatalf("%s: %v", b.detect.Tools(f == v6).Save, err)
	}
	return string(out)
}

// TestIPTablesKernelLoads runs the real sync against the real
// iptables-restore of each variant in the sandbox: every Service shape must
// load in both families, partial syncs must apply, removed Services' chains
// must go, and a restarted proxier must replace the rules in place.
func TestIPTablesKernelLoads(t *testing.T) {
	for _, variant := range []string{iptLegacy, iptNFT} {
		t.Run(variant, func(t *testing.T) {
			b := realIPT(t, variant)
			if b.fam[v6] == nil {
				t.Error("ip6tables not usable in the sandbox")
			}
			h := newHarness(t, testConfig(), nil, allShapes()...)
			h.p.ipt = b
			h.sync()
			save := iptSaveText(t, b, v4)
			for _, want := range []string{
				":KNIT-SERVICES",
				"-A PREROUTING -m comment --comment \"knit service portals\" -j KNIT-SERVICES",
				"-A KNIT-POSTROUTING -j MARK --set-xmark 0x4000/0x0", // --xor-mark, as saved
				"-m recent --rcheck --seconds 600 --reap --name KNIT-SEP-",
				"-m statistic --mode random --probability 0.50000000000",
				"--to-destination 10.42.1.5:8080",
			} {
				if !strings.Contains(save, want) {
					t.Errorf("iptables-save lacks %q", want)
				}
			}
			if save6 := iptSaveText(t, b, v6); !strings.Contains(save6, "--to-destination [fd42::2:9]:8080") {
				t.Errorf("ip6tables-save lacks the dual-stack Service's IPv6 endpoint:\n%s", save6)
			}
			if testing.Verbose() {
				t.Logf("iptables-save after the first full sync:\n%s", save)
			}

			// Partial syncs: add, change, delete.
			h.addService(service("ns2", "new", "10.43.1.1", withNodePort(31001)))
			h.addSlice(slice("ns2", "new", "new-1", 8080, eps(3, "10.42.5", otherNode)))
			h.sync()
			h.updateSlice(slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.2.15", node: otherNode}}))
			h.sync()
			h.updateService(service("ns1", "sticky", "10.43.0.30", withAffinity(30), withITPLocal))
			h.updateSlice(slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.2.15", node: otherNode}, {ip: "10.42.1.15", node: thisNode}}))
			h.sync()
			h.deleteService("ns1", "web")
			h.deleteService("ns1", "dual")
			h.sync()
			save = iptSaveText(t, b, v4)
			if !strings.Contains(save, "-A KNIT-SERVICES -d 10.43.1.1/32 -p tcp") || !strings.Contains(save, "--to-destination 10.42.5.3:8080") {
				t.Errorf("new Service not programmed:\n%s", save)
			}
			if strings.Contains(save, "10.42.1.5:8080") || strings.Contains(save, "10.43.0.20/32") {
				t.Errorf("deleted Service still programmed:\n%s", save)
			}
			if !strings.Contains(save, "--seconds 30 ") {
				t.Errorf("affinity timeout not updated:\n%s", save)
			}
			if save6 := iptSaveText(t, b, v6); strings.Contains(save6, "fd42::2:9") {
				t.Errorf("deleted dual-stack Service still in ip6tables:\n%s", save6)
			}

			// A restarted knit: a new proxier, same tables, full sync in place;
			// the chains of ns2/new (unknown to it) go.
			h2 := newHarness(t, testConfig(), nil, allShapes()...)
			h2.p.ipt = newIPTBackend(b.fam, b.log)
			h2.sync()
			save = iptSaveText(t, b, v4)
			if strings.Contains(save, "10.42.5.") || !strings.Contains(save, "10.42.1.5:8080") {
				t.Errorf("restart did not converge the rules:\n%s", save)
			}
			if n := strings.Count(save, "-j KNIT-POSTROUTING"); n != 1 {
				t.Errorf("%d jumps to KNIT-POSTROUTING after a restart, want 1", n)
			}
			// A second full sync on unchanged rules succeeds and changes nothing.
			h2.p.needFull.Store(true)
			h2.sync()
			if again := iptSaveText(t, b, v4); testkit.StripIPTablesCounters(again) != testkit.StripIPTablesCounters(save) {
				t.Errorf("a second full sync changed the rules:\n%s", lineDiff(testkit.StripIPTablesCounters(save), testkit.StripIPTablesCounters(again)))
			}
		})
	}
}

// TestIPTablesKernelDataPath sends real TCP and UDP through the rules of
// each variant in the sandbox: pods in network namespaces of their own
// joined by veths to the sandbox's namespace, which plays the node, and an
// outside client on a network of its own.
//
//	client 10.42.1.2  ──veth── node (10.42.1.1 | 10.42.2.1 | 203.0.113.1) ──veth── servers 10.42.2.2, 10.42.2.3 :8080
//	outside 203.0.113.2 ──veth──┘
func TestIPTablesKernelDataPath(t *testing.T) {
	sandbox.Require(t)
	if _, err := exec.LookPath("iptables-restore"); err != nil {
		t.Skip("iptables not installed")
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatalf("ip_forward (sandbox netns): %v", err)
	}
	client := podNS(t, "ic", "10.42.1.1/24", "10.42.1.2/24")
	server := podNS(t, "is", "10.42.2.1/24", "10.42.2.2/24")
	outside := podNS(t, "ix", "203.0.113.1/24", "203.0.113.2/24")
	def := &netlink.Route{Gw: net.ParseIP("10.42.2.2")}
	must(t, netlink.RouteReplace(def))
	t.Cleanup(func() { _ = netlink.RouteDel(def) })
	nh, err := netlink.NewHandleAt(server)
	must(t, err)
	defer nh.Close()
	in, err := nh.LinkByName("isp")
	must(t, err)
	a3, _ := netlink.ParseAddr("10.42.2.3/24")
	must(t, nh.AddrAdd(in, a3))

	// Each server answers "<its address> <the client address it sees>".
	for _, ip := range []string{"10.42.2.2", "10.42.2.3"} {
		serveClientAddr(t, server, ip+":8080", ip+" ")
		serveUDPName(t, server, ip)
	}

	local := func(ip string) ep { return ep{ip: ip, node: thisNode} }
	remote := func(ip string) ep { return ep{ip: ip, node: otherNode} }
	withRanges := func(r ...string) svcOpt { return func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = r } }
	objs := []runtime.Object{
		service("ns1", "web", "10.43.0.20", withNodePort(30080)),
		slice("ns1", "web", "web-1", 8080, []ep{remote("10.42.2.2")}),
		service("ns1", "empty", "10.43.0.21", withNodePort(30081)),
		service("ns1", "local", "10.43.0.22", withNodePort(30082), withETPLocal),
		slice("ns1", "local", "local-1", 8080, []ep{local("10.42.2.2")}),
		service("ns1", "elsewhere", "10.43.0.23", withNodePort(30083), withETPLocal),
		slice("ns1", "elsewhere", "elsewhere-1", 8080, []ep{remote("10.42.2.3")}),
		service("ns1", "sticky", "10.43.0.24", withAffinity(60)),
		slice("ns1", "sticky", "sticky-1", 8080, []ep{remote("10.42.2.2"), remote("10.42.2.3")}),
		service("ns1", "fw", "10.43.0.25", withLoadBalancer(30085, 0, "192.0.2.25"), withRanges("198.51.100.0/24")),
		slice("ns1", "fw", "fw-1", 8080, []ep{remote("10.42.2.2")}),
		service("ns1", "fwok", "10.43.0.26", withLoadBalancer(30086, 0, "192.0.2.26"), withRanges("203.0.113.0/24")),
		slice("ns1", "fwok", "fwok-1", 8080, []ep{remote("10.42.2.2")}),
		service("ns1", "ext", "10.43.0.27", withExternalIPs("192.0.2.27")),
		slice("ns1", "ext", "ext-1", 8080, []ep{remote("10.42.2.3")}),
	}

	for _, variant := range []string{iptLegacy, iptNFT} {
		t.Run(variant, func(t *testing.T) {
			b := realIPT(t, variant)
			h := newHarness(t, testConfig(), nil, objs...)
			h.p.ipt = b
			h.p.ct = netlinkConntrack{}
			h.sync()

			dial := func(ns netns.NsHandle, addr string, timeout time.Duration) (string, error) {
				c, err := inNSErr(ns, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, timeout) })
				if err != nil {
					return "", err
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(3 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				return strings.TrimSpace(line), err
			}
			tests := []struct {
				name string
				from netns.NsHandle
				addr string
				// want is "<server> <client seen>"; "refused" or
				// "timeout" for connections that must fail so.
				want string
			}{
				{"ClusterIP from a pod keeps the client address", client, "10.43.0.20:80", "10.42.2.2 10.42.1.2"},
				{"NodePort is masqueraded (policy Cluster)", client, "10.42.1.1:30080", "10.42.2.2 10.42.2.1"},
				{"NodePort from outside is masqueraded", outside, "203.0.113.1:30080", "10.42.2.2 10.42.2.1"},
				{"ClusterIP from outside the cluster CIDR is masqueraded", outside, "10.43.0.20:80", "10.42.2.2 10.42.2.1"},
				{"no endpoints: refused at once", client, "10.43.0.21:80", "refused"},
				{"no endpoints, NodePort: refused at once", outside, "203.0.113.1:30081", "refused"},
				{"undefined port of a ClusterIP: refused", client, "10.43.0.20:81", "refused"},
				{"unallocated ClusterIP: dropped", client, "10.43.9.9:80", "timeout"},
				{"ETP Local from outside keeps the client address", outside, "203.0.113.1:30082", "10.42.2.2 203.0.113.2"},
				{"ETP Local, no local endpoint: dropped for outside clients", outside, "203.0.113.1:30083", "timeout"},
				{"ETP Local, no local endpoint: pods short-circuit to the cluster endpoints", client, "10.42.1.1:30083", "10.42.2.3 10.42.1.2"},
				{"hairpin: a pod reaching itself through its Service is masqueraded", server, "10.43.0.22:80", "10.42.2.2 10.42.2.1"},
				{"loadBalancerSourceRanges: other sources dropped", outside, "192.0.2.25:80", "timeout"},
				{"loadBalancerSourceRanges: allowed source passes", outside, "192.0.2.26:80", "10.42.2.2 10.42.2.1"},
				{"ExternalIP", outside, "192.0.2.27:80", "10.42.2.3 10.42.2.1"},
			}
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					timeout := 3 * time.Second
					if tc.want == "timeout" {
						timeout = time.Second
					}
					start := time.Now()
					got, err := dial(tc.from, tc.addr, timeout)
					switch {
					case tc.want == "refused":
						if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
							t.Errorf("%s: %q, %v after %v; want connection refused at once", tc.addr, got, err, time.Since(start))
						}
					case tc.want == "timeout":
						var ne net.Error
						if !errors.As(err, &ne) || !ne.Timeout() {
							t.Errorf("%s: %q, %v; want a timeout (dropped)", tc.addr, got, err)
						}
					case err != nil || got != tc.want:
						t.Errorf("%s: got %q, %v; want %q", tc.addr, got, err, tc.want)
					}
				})
			}

			t.Run("session affinity sticks", func(t *testing.T) {
				first, err := dial(client, "10.43.0.24:80", 3*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				for range 10 {
					if got, err := dial(client, "10.43.0.24:80", 3*time.Second); err != nil || got != first {
						t.Fatalf("affinity broken: first %q, then %q, %v", first, got, err)
					}
				}
			})

			t.Run("endpoints appear: the Service answers", func(t *testing.T) {
				h.addSlice(slice("ns1", "empty", "empty-1", 8080, []ep{remote("10.42.2.2")}))
				h.sync()
				if got, err := dial(client, "10.43.0.21:80", 3*time.Second); err != nil || got != "10.42.2.2 10.42.1.2" {
					t.Errorf("after endpoints appeared: %q, %v", got, err)
				}
			})

			t.Run("UDP moves off a removed endpoint", func(t *testing.T) {
				h.addService(service("ns1", "dns", "10.43.0.30", withPorts(corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP})))
				h.addSlice(udpSlice("dns", "10.42.2.2", "10.42.2.3"))
				h.sync()
				uc := inNS(t, client, func() (net.Conn, error) { return net.Dial("udp", "10.43.0.30:53") })
				defer uc.Close()
				first := askUDP(uc)
				if first == "" {
					t.Fatal("UDP Service does not answer")
				}
				other := map[string]string{"10.42.2.2": "10.42.2.3", "10.42.2.3": "10.42.2.2"}[first]
				h.updateSlice(udpSlice("dns", other))
				h.sync()
				if got := askUDP(uc); got != other {
					t.Errorf("after %s left the Service, the flow still goes to %q; want %s", first, got, other)
				}
			})
		})
	}
}

// TestRemoveOtherBackend: after a switch of backend (or of iptables
// variant), the first sync of the new one removes what knit left in the old
// one, so that stale rules do not keep DNATing to old endpoints; rules that
// are not knit's stay.
func TestRemoveOtherBackend(t *testing.T) {
	requireSandbox(t) // nft too
	if _, err := exec.LookPath("iptables-legacy-restore"); err != nil {
		t.Skip("iptables-legacy not installed")
	}
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", tableName).Run() })
	// Someone else's rule, which must survive.
	if out, err := exec.Command("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("iptables-legacy", "-t", "nat", "-D", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN").Run()
	})

	// knit on iptables-legacy.
	legacy := realIPT(t, iptLegacy)
	h1 := newHarness(t, testConfig(), nil, allShapes()...)
	h1.p.ipt = legacy
	h1.sync()
	if save := iptSaveText(t, legacy, v4); !strings.Contains(save, ":KNIT-SERVICES") {
		t.Fatal("no knit rules in iptables-legacy")
	}
	// The overlay's FORWARD accept chain is not the proxy's to remove.
	overlayFwd := "*filter\n:KNIT-FORWARD - [0:0]\n-A FORWARD -m comment --comment \"knit overlay forward rules\" -j KNIT-FORWARD\n" +
		"-A KNIT-FORWARD -s 10.42.0.0/16 -j ACCEPT\nCOMMIT\n"
	restore := exec.Command("iptables-legacy-restore", "--noflush")
	restore.Stdin = strings.NewReader(overlayFwd)
	if out, err := restore.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("iptables-legacy", "-D", "FORWARD", "-m", "comment", "--comment", "knit overlay forward rules", "-j", "KNIT-FORWARD").Run()
		_ = exec.Command("iptables-legacy", "-F", "KNIT-FORWARD").Run()
		_ = exec.Command("iptables-legacy", "-X", "KNIT-FORWARD").Run()
	})

	// Restarted on nftables: the legacy rules go after its first sync.
	nft, lister, err := newNFT()
	if err != nil {
		t.Fatal(err)
	}
	h2 := newHarness(t, testConfig(), nft, allShapes()...)
	h2.p.backend.lister = lister
	h2.p.leftovers = h2.p.removeOtherBackend
	h2.sync()
	for _, f := range []family{v4, v6} {
		if save := iptSaveText(t, legacy, f); holdsProxyChains([]byte(save)) || strings.Contains(save, "-j KNIT-SERVICES") {
			t.Errorf("knit's iptables-legacy rules (%s) left after switching to nftables:\n%s", f, save)
		}
	}
	if save := iptSaveText(t, legacy, v4); !strings.Contains(save, "-A POSTROUTING -s 192.0.2.0/24 -j RETURN") {
		t.Errorf("a rule that is not knit's was removed:\n%s", save)
	}
	if save := iptSaveText(t, legacy, v4); !strings.Contains(save, "-A KNIT-FORWARD -s 10.42.0.0/16 -j ACCEPT") ||
		!strings.Contains(save, "-j KNIT-FORWARD") {
		t.Errorf("the overlay's KNIT-FORWARD chain was removed with the proxy's rules:\n%s", save)
	}
	if err := exec.Command("nft", "list", "table", "inet", tableName).Run(); err != nil {
		t.Fatal("nftables table missing")
	}

	// Restarted on iptables-nft: the nftables table goes.
	nftVariant := realIPT(t, iptNFT)
	h3 := newHarness(t, testConfig(), nil, allShapes()...)
	h3.p.ipt = nftVariant
	h3.p.leftovers = h3.p.removeOtherBackend
	h3.sync()
	if err := exec.Command("nft", "list", "table", "inet", tableName).Run(); err == nil {
		t.Error("the nftables table is still there after switching to iptables")
	}
	if save := iptSaveText(t, nftVariant, v4); !strings.Contains(save, ":KNIT-SERVICES") {
		t.Error("no knit rules in iptables-nft")
	}
}

// TestIPTablesKernelCanary: a real "firewall reload" (iptables-restore
// without --noflush, which empties the tables) is noticed through the
// canary chain, and the full sync it triggers restores knit's rules.
func TestIPTablesKernelCanary(t *testing.T) {
	period := iptCanaryPeriod
	t.Cleanup(func() { iptCanaryPeriod = period })
	iptCanaryPeriod = 50 * time.Millisecond
	for _, variant := range []string{iptLegacy, iptNFT} {
		t.Run(variant, func(t *testing.T) {
			b := realIPT(t, variant)
			flushed := make(chan struct{}, 1)
			b.onFlush = func() {
				select {
				case flushed <- struct{}{}:
				default:
				}
			}
			h := newHarness(t, testConfig(), nil, allShapes()...)
			h.p.ipt = b
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if _, err := h.p.syncOnce(ctx); err != nil {
				t.Fatal(err)
			}
			reload := exec.Command(b.detect.Tools(false).Restore)
			reload.Stdin = strings.NewReader("*mangle\nCOMMIT\n*nat\nCOMMIT\n*filter\nCOMMIT\n")
			if out, err := reload.CombinedOutput(); err != nil {
				t.Fatalf("reload: %v: %s", err, out)
			}
			if save := iptSaveText(t, b, v4); strings.Contains(save, "KNIT-") {
				t.Fatalf("the reload left knit's rules:\n%s", save)
			}
			select {
			case <-flushed:
			case <-time.After(5 * time.Second):
				t.Fatal("the reload was not noticed")
			}
			h.p.needFull.Store(true)
			if _, err := h.p.syncOnce(ctx); err != nil {
				t.Fatal(err)
			}
			save := iptSaveText(t, b, v4)
			for _, want := range []string{":KNIT-PROXY-CANARY", "-A PREROUTING -m comment --comment \"knit service portals\" -j KNIT-SERVICES", "--to-destination 10.42.1.5:8080"} {
				if !strings.Contains(save, want) {
					t.Errorf("after the full sync, iptables-save lacks %q", want)
				}
			}
		})
	}
}

// TestIPTablesKernelMismatch runs the detection against the real
// iptables-legacy-save and iptables-nft-save: rules in both variants are a
// mismatch, reported by the proxier's warnings (on /readyz) and metric.
func TestIPTablesKernelMismatch(t *testing.T) {
	sandbox.Require(t)
	for _, v := range []string{iptLegacy, iptNFT} {
		if _, err := exec.LookPath("iptables-" + v + "-save"); err != nil {
			t.Skipf("iptables-%s not installed", v)
		}
	}
	rule := func(bin, op string, args ...string) {
		t.Helper()
		if out, err := exec.Command(bin, append([]string{op}, args...)...).CombinedOutput(); err != nil && op == "-A" {
			t.Fatalf("%s: %v: %s", bin, err, out)
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

	// One variant in use: no mismatch, and that variant is chosen.
	legacyRule := []string{"POSTROUTING", "-t", "nat", "-s", "192.0.2.0/24", "-j", "RETURN"}
	rule("iptables-legacy", "-A", legacyRule...)
	t.Cleanup(func() { rule("iptables-legacy", "-D", legacyRule...) })
	b, err := newIPTables(BackendIPTables, log)
	if err != nil {
		t.Fatal(err)
	}
	if b.detect.Variant != iptLegacy || b.detect.Mismatch {
		t.Errorf("legacy in use: chose %s (%s), mismatch %v", b.detect.Variant, b.detect.Why, b.detect.Mismatch)
	}

	// Both in use: reported.
	nftRule := []string{"FORWARD", "-s", "192.0.2.0/24", "-j", "ACCEPT"}
	rule("iptables-nft", "-A", nftRule...)
	t.Cleanup(func() { rule("iptables-nft", "-D", nftRule...) })
	b, err = newIPTables(BackendIPTables, log)
	if err != nil {
		t.Fatal(err)
	}
	if !b.detect.Mismatch || b.detect.Rules[iptLegacy] != 1 || b.detect.Rules[iptNFT] != 1 {
		t.Fatalf("both in use: detection %+v", b.detect)
	}
	h := newHarness(t, testConfig(), nil)
	reg := prometheus.NewRegistry()
	if err := h.p.initBackend(b, reg); err != nil {
		t.Fatal(err)
	}
	if w := h.p.Warnings(); len(w) != 1 || !strings.Contains(w[0], "iptables-legacy (1 rules) and iptables-nft (1 rules)") {
		t.Errorf("warnings = %q", w)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP knit_proxy_iptables_mismatch Whether both iptables-legacy and iptables-nft held rules when the proxy started (1): components disagree on the variant; see the agent's log and /readyz.
# TYPE knit_proxy_iptables_mismatch gauge
knit_proxy_iptables_mismatch 1
`), "knit_proxy_iptables_mismatch"); err != nil {
		t.Error(err)
	}
}

// TestIPTablesKernelDataPathIPv6 sends real TCP through the ip6tables rules:
// a dual-stack Service's IPv6 ClusterIP is DNATed to the IPv6 endpoint, and
// an IPv6 ClusterIP without endpoints refuses at once. (fd42::/56 is the
// test's cluster CIDR: the pods are in it, so they are not masqueraded.)
//
//	client fd42:0:0:1::2 ──veth── node (fd42:0:0:1::1 | fd42:0:0:2::1) ──veth── server [fd42:0:0:2::2]:8080
func TestIPTablesKernelDataPathIPv6(t *testing.T) {
	sandbox.Require(t)
	if _, err := exec.LookPath("ip6tables-restore"); err != nil {
		t.Skip("ip6tables not installed")
	}
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/all/forwarding", []byte("1"), 0o644); err != nil {
		t.Fatalf("IPv6 forwarding (sandbox netns): %v", err)
	}
	client := podNS(t, "jc", "10.42.11.1/24", "10.42.11.2/24")
	server := podNS(t, "js", "10.42.12.1/24", "10.42.12.2/24")
	addV6 := func(ns netns.NsHandle, host, pod string, hostCIDR, podCIDR string) {
		t.Helper()
		hl, err := netlink.LinkByName(host)
		must(t, err)
		ha, _ := netlink.ParseAddr(hostCIDR)
		ha.Flags = unix.IFA_F_NODAD
		must(t, netlink.AddrAdd(hl, ha))
		nh, err := netlink.NewHandleAt(ns)
		must(t, err)
		defer nh.Close()
		pl, err := nh.LinkByName(pod)
		must(t, err)
		pa, _ := netlink.ParseAddr(podCIDR)
		pa.Flags = unix.IFA_F_NODAD
		must(t, nh.AddrAdd(pl, pa))
		must(t, nh.RouteAdd(&netlink.Route{Gw: ha.IP, LinkIndex: pl.Attrs().Index}))
	}
	addV6(client, "jc", "jcp", "fd42:0:0:1::1/64", "fd42:0:0:1::2/64")
	addV6(server, "js", "jsp", "fd42:0:0:2::1/64", "fd42:0:0:2::2/64")
	// As in the IPv4 test: a default route, so that traffic to a ClusterIP
	// that is not DNATed reaches the forward hook.
	def := &netlink.Route{Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, Gw: net.ParseIP("fd42:0:0:2::2")}
	must(t, netlink.RouteReplace(def))
	t.Cleanup(func() { _ = netlink.RouteDel(def) })

	serveClientAddr(t, server, "[fd42:0:0:2::2]:8080", "")

	objs := []runtime.Object{
		service("ns1", "dual", "10.43.0.40", withClusterIPs("10.43.0.40", "fd43::40")),
		slice("ns1", "dual", "dual-v6", 8080, []ep{{ip: "fd42:0:0:2::2", node: otherNode}}),
		service("ns1", "empty6", "fd43::41"),
	}
	for _, variant := range []string{iptLegacy, iptNFT} {
		t.Run(variant, func(t *testing.T) {
			b := realIPT(t, variant)
			h := newHarness(t, testConfig(), nil, objs...)
			h.p.ipt = b
			h.sync()
			c, err := inNSErr(client, func() (net.Conn, error) { return net.DialTimeout("tcp", "[fd43::40]:80", 3*time.Second) })
			if err != nil {
				t.Fatalf("IPv6 ClusterIP: %v", err)
			}
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if got := strings.TrimSpace(line); err != nil || got != "fd42:0:0:1::2" {
				t.Errorf("IPv6 ClusterIP: server saw %q, %v; want fd42:0:0:1::2", got, err)
			}
			start := time.Now()
			_, err = inNSErr(client, func() (net.Conn, error) { return net.DialTimeout("tcp", "[fd43::41]:80", 3*time.Second) })
			if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
				t.Errorf("IPv6 Service without endpoints: %v after %v; want connection refused at once", err, time.Since(start))
			}
		})
	}
}
