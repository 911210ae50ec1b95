package localaddr_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"

	"knit.dev/knit/dns"
	"knit.dev/knit/dns/localaddr"
	"knit.dev/knit/lab/sandbox"
)

// Every test here changes links and addresses: they run only inside the
// sandbox (sandbox.Main re-executes the test binary under unshare).
func TestMain(m *testing.M) { sandbox.Main(m) }

func addrsOf(t *testing.T, name string) []string {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	list, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range list {
		if a.IP.IsLinkLocalUnicast() {
			continue
		}
		out = append(out, a.IPNet.String())
	}
	return out
}

// holder is the link Ensure(name) puts addresses on here: name itself, or lo
// on a kernel without the dummy driver.
func holder(t *testing.T, name string) string {
	t.Helper()
	err := netlink.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "knit-probe"}})
	if errors.Is(err, unix.EOPNOTSUPP) {
		t.Logf("no dummy driver in this kernel: addresses go on lo")
		return "lo"
	}
	if err == nil {
		_ = netlink.LinkDel(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "knit-probe"}})
	}
	return name
}

// hostAddrs are the /32 and /128 addresses of a link.
func hostAddrs(t *testing.T, name string) []string {
	var out []string
	for _, a := range addrsOf(t, name) {
		if (strings.HasSuffix(a, "/32") || strings.HasSuffix(a, "/128")) && a != "::1/128" {
			out = append(out, a)
		}
	}
	return out
}

func TestEnsureIdempotent(t *testing.T) {
	sandbox.Require(t)
	link := holder(t, "knit-dnst")
	ips := []netip.Addr{netip.MustParseAddr("10.43.0.10"), netip.MustParseAddr("fd43::a")}
	for i := range 3 {
		if err := localaddr.Ensure("knit-dnst", ips); err != nil {
			t.Fatalf("Ensure #%d: %v", i, err)
		}
	}
	got := hostAddrs(t, link)
	if len(got) != 2 || got[0] != "10.43.0.10/32" || got[1] != "fd43::a/128" {
		t.Fatalf("addresses %v", got)
	}
	l, _ := netlink.LinkByName(link)
	if (link != "lo" && l.Type() != "dummy") || l.Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("link %s up=%v", l.Type(), l.Attrs().Flags&net.FlagUp != 0)
	}
	// A link of another kind with that name is not taken over.
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "knit-dnsb"}}); err != nil {
		t.Fatal(err)
	}
	if err := localaddr.Ensure("knit-dnsb", ips); err == nil {
		t.Fatal("Ensure took over a bridge")
	}
}

// TestRunOnClusterDNSIP runs the DNS server with BindLocalIP on the cluster
// DNS Service IP: the address becomes local, queries to it are answered
// over UDP and TCP, and the address stays after Run returns.
func TestRunOnClusterDNSIP(t *testing.T) {
	sandbox.Require(t)
	link := holder(t, dns.LocalLinkName)
	client := fake.NewClientset(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "kubernetes"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.43.0.1", ClusterIPs: []string{"10.43.0.1"}},
	})
	factory := informers.NewSharedInformerFactory(client, 0)
	cfg := dns.Config{
		ListenAddrs:  []netip.AddrPort{netip.MustParseAddrPort("10.43.0.10:53")},
		BindLocalIP:  true,
		ServiceCIDRs: []netip.Prefix{netip.MustParsePrefix("10.43.0.0/16")},
		ResolvConf:   "/nonexistent",
	}
	s, err := dns.New(cfg, dns.Sources{Services: factory.Core().V1().Services(), EndpointSlices: factory.Discovery().V1().EndpointSlices()},
		prometheus.NewRegistry(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	factory.Start(ctx.Done())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for !s.Ready() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	for _, netw := range []string{"udp", "tcp"} {
		m := new(mdns.Msg)
		m.SetQuestion("kubernetes.default.svc.cluster.local.", mdns.TypeA)
		r, _, err := (&mdns.Client{Net: netw, Timeout: time.Second}).Exchange(m, "10.43.0.10:53")
		if err != nil || r.Rcode != 0 || len(r.Answer) != 1 {
			t.Fatalf("%s query to 10.43.0.10: %v %v", netw, r, err)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	factory.Shutdown()
	if got := hostAddrs(t, link); !slices.Contains(got, "10.43.0.10/32") {
		t.Fatalf("after Run returned, %s has %v; want the address kept", link, got)
	}
}
