package node

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/lab/sandbox"
)

// nodeNS is a throwaway network namespace standing for a node: an uplink
// eth0 (a veth whose peer stays in the namespace, MTU 1400; this kernel
// has no dummy links) with the default route.
func nodeNS(t *testing.T) ns.NetNS {
	t.Helper()
	sandbox.Require(t)
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		netns.Close()
		testutils.UnmountNS(netns)
	})
	inNS(t, netns, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU = "eth0", 1400
		eth0 := &netlink.Veth{LinkAttrs: attrs, PeerName: "uplink"}
		if err := netlink.LinkAdd(eth0); err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("198.18.0.1"), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(eth0); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("198.18.0.254")})
	})
	return netns
}

func inNS(t *testing.T, netns ns.NetNS, f func() error) {
	t.Helper()
	if err := netns.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

func readSysctlIn(t *testing.T, netns ns.NetNS, path string) string {
	t.Helper()
	var v string
	inNS(t, netns, func() error {
		b, err := os.ReadFile("/proc/sys/" + path)
		v = strings.TrimSpace(string(b))
		return err
	})
	return v
}

func bridgeAddrs(t *testing.T, netns ns.NetNS, name string) (mtu int, up bool, addrs map[netip.Prefix]bool) {
	t.Helper()
	addrs = map[netip.Prefix]bool{}
	inNS(t, netns, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if _, ok := l.(*netlink.Bridge); !ok {
			return errors.New(name + " is not a bridge")
		}
		mtu, up = l.Attrs().MTU, l.Attrs().Flags&net.FlagUp != 0
		list, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		for _, a := range list {
			ip, _ := netip.AddrFromSlice(a.IP)
			ones, _ := a.Mask.Size()
			if ip.Unmap().IsGlobalUnicast() {
				addrs[netip.PrefixFrom(ip.Unmap(), ones)] = true
			}
		}
		return err
	})
	return mtu, up, addrs
}

// TestSetupInNetns runs the node setup against the real kernel, in a
// throwaway namespace inside the sandbox: bridge, gateway addresses, MTU
// from the default route, the namespace's sysctls, the files; then a
// podCIDR change; and nothing leaks into the sandbox's own namespace.
func TestSetupInNetns(t *testing.T) {
	netns := nodeNS(t)
	rootForward, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	rootRedirects, _ := os.ReadFile("/proc/sys/net/ipv4/conf/all/send_redirects")

	h := newHarness(t, Config{ClusterCIDRs: []netip.Prefix{pfx("10.42.0.0/16"), pfx("fd42::/56")}},
		testNode("n1", "10.42.1.0/24", "fd42:0:0:1::/64"))
	h.s.k = netlinkKernel{do: func(f func() error) error { return netns.Do(func(ns.NetNS) error { return f() }) }}
	h.sync()
	if !h.s.Ready() {
		t.Fatal("not ready")
	}

	mtu, up, addrs := bridgeAddrs(t, netns, "cni0")
	if mtu != 1400 || !up || len(addrs) != 2 || !addrs[pfx("10.42.1.1/24")] || !addrs[pfx("fd42:0:0:1::1/64")] {
		t.Fatalf("cni0: mtu %d up %v addrs %v", mtu, up, addrs)
	}
	nc, err := plugin.ReadNodeConfig(h.cfg.RunDir)
	if err != nil || nc.MTU != 1400 {
		t.Fatalf("node.json %+v %v: want the default route interface's MTU 1400", nc, err)
	}
	for _, sc := range sysctls("cni0", nc.PodCIDRs) {
		got := readSysctlIn(t, netns, sc.path)
		if sc.optional && got == "" {
			t.Logf("%s not available in this kernel", sc.path)
			continue
		}
		if got != sc.value {
			t.Errorf("in the node netns %s = %q, want %q", sc.path, got, sc.value)
		}
	}
	if !exists(h.confPath()) {
		t.Fatal("no conflist")
	}

	// A foreign address on the bridge, then a new podCIDR.
	inNS(t, netns, func() error {
		l, err := netlink.LinkByName("cni0")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("192.0.2.1"), Mask: net.CIDRMask(24, 32)}})
	})
	h.updateNode(testNode("n1", "10.42.5.0/24", "fd42:0:0:5::/64"))
	h.sync()
	_, _, addrs = bridgeAddrs(t, netns, "cni0")
	if len(addrs) != 3 || !addrs[pfx("10.42.5.1/24")] || !addrs[pfx("fd42:0:0:5::1/64")] || !addrs[pfx("192.0.2.1/24")] {
		t.Fatalf("after the podCIDR change cni0 has %v", addrs)
	}

	// A second sync changes nothing and fails nothing.
	h.sync()

	if b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); string(b) != string(rootForward) {
		t.Errorf("ip_forward of the sandbox's own namespace changed: %q -> %q", rootForward, b)
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/all/send_redirects"); string(b) != string(rootRedirects) {
		t.Errorf("send_redirects of the sandbox's own namespace changed: %q -> %q", rootRedirects, b)
	}
	if _, err := netlink.LinkByName("cni0"); err == nil {
		t.Error("cni0 appeared in the sandbox's own namespace")
	}
}

// TestReconcileDeletesHostVeth: a released reservation's host veth, if it
// survived its pod, is deleted in the node namespace.
func TestReconcileDeletesHostVeth(t *testing.T) {
	netns := nodeNS(t)
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	h.s.k = netlinkKernel{do: func(f func() error) error { return netns.Do(func(ns.NetNS) error { return f() }) }}
	h.s.pods = fakePods{}
	h.sync()

	host := plugin.HostVethName("gone", "eth0")
	inNS(t, netns, func() error {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = host
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "leftover"})
	})
	store, err := h.s.openStore()
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Update(func(st *ipam.State) error {
		_, err := st.Allocate(ipam.Request{Attachment: ipam.Attachment{ContainerID: "gone", IfName: "eth0"},
			Netns: "/run/netns/does-not-exist", Pod: ipam.PodRef{Namespace: "default", Name: "gone", UID: "u"},
			Now: time.Now().Add(-time.Hour)}, []netip.Prefix{pfx("10.42.1.0/24")})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := h.s.reconcile(); err != nil {
		t.Fatal(err)
	}
	inNS(t, netns, func() error {
		if _, err := netlink.LinkByName(host); err == nil {
			return errors.New("host veth " + host + " still exists")
		}
		return nil
	})
	if st, _ := store.View(); len(st.Reservations) != 0 {
		t.Fatalf("reservations left: %+v", st.Reservations)
	}
}
