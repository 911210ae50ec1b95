package plugin

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"knit.dev/knit/cni/ipam"
)

// hostVethPrefix starts the name of every host-side veth the plugin creates;
// GC deletes leaked links by this prefix, so nothing else may use it.
const hostVethPrefix = "knv"

// HostVethName is the host-side veth name of an attachment: deterministic,
// so DEL and GC find it without any state, and 15 bytes (IFNAMSIZ-1).
func HostVethName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifName))
	return hostVethPrefix + hex.EncodeToString(sum[:6])
}

// podMAC derives the pod interface's MAC from its first address (0a:58 and
// the last four bytes of the IP, as OVN-Kubernetes does): a pod that
// inherits a released IP also inherits its MAC, so stale neighbour entries
// on the node and on other pods stay right.
func podMAC(ips []netip.Addr) net.HardwareAddr {
	mac := net.HardwareAddr{0x0a, 0x58, 0, 0, 0, 0}
	if len(ips) > 0 {
		b := ips[0].As16()
		copy(mac[2:], b[12:])
	}
	return mac
}

// randomMAC returns a random locally administered unicast MAC. Setting the
// host veth's MAC ourselves saves a netlink round trip to read back the one
// the kernel would pick.
func randomMAC() (net.HardwareAddr, error) {
	mac := make(net.HardwareAddr, 6)
	if _, err := rand.Read(mac); err != nil {
		return nil, err
	}
	mac[0] = (mac[0] | 0x02) &^ 0x01
	return mac, nil
}

// ipNet converts an address and its pool into the *net.IPNet netlink wants.
func ipNet(ip netip.Addr, pool netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(ip.AsSlice()), Mask: net.CIDRMask(pool.Bits(), ip.BitLen())}
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// gatewayAddrs are the addresses of the node bridge: the gateway of each
// podCIDR, with the podCIDR's prefix length.
func gatewayAddrs(podCIDRs []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(podCIDRs))
	for _, p := range podCIDRs {
		out = append(out, netip.PrefixFrom(ipam.Gateway(p), p.Bits()))
	}
	return out
}

// EnsureBridge makes the node bridge exist, be up, have the given MTU and
// carry the gateway address of every podCIDR. Gateway addresses of podCIDRs
// the node no longer has (stale, a prefix of `owned` that is not a current
// gateway) are removed; addresses someone else put on the bridge are left.
// It works in the calling thread's network namespace.
func EnsureBridge(name string, mtu int, podCIDRs []netip.Prefix, owned func(netip.Prefix) bool) (*netlink.Bridge, error) {
	l, err := netlinksafe.LinkByName(name)
	created := false
	if isNotFound(err) {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.MTU = mtu
		if err = netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		created = true
		l, err = netlinksafe.LinkByName(name)
	}
	if err != nil {
		return nil, fmt.Errorf("look up bridge %s: %w", name, err)
	}
	br, ok := l.(*netlink.Bridge)
	if !ok {
		return nil, fmt.Errorf("%s exists but is a %s, not a bridge", name, l.Type())
	}
	if created {
		// Pin the bridge's MAC: left alone, a bridge takes the lowest MAC of
		// its ports and changes it as pods come and go, and every pod's
		// neighbour entry for the gateway goes stale.
		if err := netlink.LinkSetHardwareAddr(br, br.HardwareAddr); err != nil {
			return nil, fmt.Errorf("pin MAC of bridge %s: %w", name, err)
		}
		// The bridge's routes are ours, not a router advertisement's.
		_ = writeSysctl(fmt.Sprintf("net/ipv6/conf/%s/accept_ra", name), "0")
	}
	if br.MTU != mtu {
		if err := netlink.LinkSetMTU(br, mtu); err != nil {
			return nil, fmt.Errorf("set MTU %d on bridge %s: %w", mtu, name, err)
		}
	}
	addrs, err := netlinksafe.AddrList(br, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses of bridge %s: %w", name, err)
	}
	want := gatewayAddrs(podCIDRs)
	have := make(map[netip.Prefix]bool, len(addrs))
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		p := netip.PrefixFrom(ip.Unmap(), ones)
		have[p] = true
		if owned != nil && owned(p) && !containsPrefix(want, p) && ip.IsGlobalUnicast() {
			if err := netlink.AddrDel(br, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return nil, fmt.Errorf("remove stale gateway %s from %s: %w", p, name, err)
			}
		}
	}
	for _, gw := range want {
		if have[gw] {
			continue
		}
		a := &netlink.Addr{IPNet: ipNet(gw.Addr(), gw)}
		if gw.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(br, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("add gateway %s to bridge %s: %w", gw, name, err)
		}
	}
	if br.Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("set bridge %s up: %w", name, err)
		}
	}
	return br, nil
}

func containsPrefix(ps []netip.Prefix, p netip.Prefix) bool {
	for _, q := range ps {
		if q == p {
			return true
		}
	}
	return false
}

// writeSysctl writes a /proc/sys value in the calling thread's network
// namespace (path relative to /proc/sys, with slashes).
func writeSysctl(path, value string) error {
	return os.WriteFile("/proc/sys/"+path, []byte(value), 0o644)
}

func readSysctl(path string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + path)
	return strings.TrimSpace(string(b)), err
}

// podLink is what setupPod built, for the CNI result.
type podLink struct {
	bridgeName, bridgeMAC string
	hostName, hostMAC     string
	podName, podMAC       string
}

// setupPod plumbs one pod: a veth pair created in the host namespace with
// its peer born in the pod namespace under its final name, the host end
// already up and enslaved to the bridge, then the pod end's addresses and
// default routes through a netlink socket opened in the pod namespace (no
// thread namespace switching, no dumps). IPv6 addresses are added with
// IFA_F_NODAD: the addresses come from our own IPAM, duplicate address
// detection would only delay the pod by a second or more.
func setupPod(node *NodeConfig, podNS ns.NetNS, ifName, hostName string, ips []netip.Addr) (*podLink, error) {
	netnsPath := podNS.Path()
	br, err := netlinksafe.LinkByName(node.Bridge)
	if isNotFound(err) {
		// The agent creates the bridge before it writes node.json; if it
		// vanished since (someone deleted it), recreate it rather than fail
		// every pod until the agent's next resync.
		br, err = EnsureBridge(node.Bridge, node.MTU, node.PodCIDRs, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("bridge %s: %w", node.Bridge, err)
	}
	if _, ok := br.(*netlink.Bridge); !ok {
		return nil, fmt.Errorf("bridge %s: is a %s, not a bridge", node.Bridge, br.Type())
	}

	hostMAC, err := randomMAC()
	if err != nil {
		return nil, err
	}
	pl := &podLink{
		bridgeName: node.Bridge, bridgeMAC: br.Attrs().HardwareAddr.String(),
		hostName: hostName, hostMAC: hostMAC.String(),
		podName: ifName, podMAC: podMAC(ips).String(),
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = hostName
	attrs.MTU = node.MTU
	attrs.HardwareAddr = hostMAC
	attrs.Flags = net.FlagUp
	attrs.MasterIndex = br.Attrs().Index
	veth := &netlink.Veth{
		LinkAttrs:        attrs,
		PeerName:         ifName,
		PeerHardwareAddr: podMAC(ips),
		PeerNamespace:    netlink.NsFd(int(podNS.Fd())),
	}
	err = netlink.LinkAdd(veth)
	if errors.Is(err, unix.EEXIST) {
		// Either a leftover host end of this very attachment (an ADD retried
		// after a crash) or the pod already has ifName. Remove ours, retry.
		if old, lerr := netlinksafe.LinkByName(hostName); lerr == nil {
			if derr := netlink.LinkDel(old); derr != nil {
				return nil, fmt.Errorf("remove stale host veth %s: %w", hostName, derr)
			}
			veth.Index = 0
			err = netlink.LinkAdd(veth)
		}
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("interface %s already exists in netns %s", ifName, netnsPath)
		}
	}
	if err != nil {
		// LinkAdd creates, then enslaves: a failure after creation leaves the
		// pair behind; the caller's rollback deletes it by name.
		return pl, fmt.Errorf("create veth %s/%s: %w", hostName, ifName, err)
	}
	if node.Hairpin {
		if err := netlink.LinkSetHairpin(veth, true); err != nil {
			return pl, fmt.Errorf("set hairpin on %s: %w", hostName, err)
		}
	}

	h, err := netlinksafe.NewHandleAt(netns.NsHandle(podNS.Fd()), unix.NETLINK_ROUTE)
	if err != nil {
		return pl, fmt.Errorf("netlink in netns %s: %w", netnsPath, err)
	}
	defer h.Close()
	pod, err := h.LinkByName(ifName)
	if err != nil {
		return pl, fmt.Errorf("look up %s in netns %s: %w", ifName, netnsPath, err)
	}
	if err := h.LinkSetUp(pod); err != nil {
		return pl, fmt.Errorf("set %s up: %w", ifName, err)
	}
	for i, ip := range ips {
		a := &netlink.Addr{IPNet: ipNet(ip, node.PodCIDRs[i])}
		if ip.Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(pod, a); err != nil {
			return pl, fmt.Errorf("add address %s to %s: %w", a.IPNet, ifName, err)
		}
	}
	for i := range ips {
		gw := ipam.Gateway(node.PodCIDRs[i])
		r := &netlink.Route{LinkIndex: pod.Attrs().Index, Gw: net.IP(gw.AsSlice())}
		if err := h.RouteAdd(r); err != nil {
			return pl, fmt.Errorf("add default route via %s on %s: %w", gw, ifName, err)
		}
	}
	return pl, nil
}

// sameNetNS reports whether podNS is the namespace the plugin runs in (a
// runtime bug that would put the pod interface on the host).
func sameNetNS(podNS ns.NetNS) bool {
	var a, b unix.Stat_t
	if unix.Fstat(int(podNS.Fd()), &a) != nil || unix.Stat("/proc/self/ns/net", &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// netnsError is a CNI_NETNS that cannot be opened.
type netnsError struct {
	path string
	err  error
}

func (e *netnsError) Error() string { return fmt.Sprintf("CNI_NETNS %q: %v", e.path, e.err) }
func (e *netnsError) Unwrap() error { return e.err }

// deleteLink removes a link by name; a missing link is not an error. The
// peer of a veth goes with it, so deleting the host end also removes the
// pod end, without entering the pod namespace (which may be gone).
func deleteLink(name string) error {
	l, err := netlinksafe.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// detachLink sets a link down and takes it off its bridge in one
// RTM_SETLINK addressed by name (no lookup first); a missing link is not an
// error. DEL uses it on the host veth instead of deleting it (see del).
func detachLink(name string) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Change = unix.IFF_UP
	msg.Flags = 0
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
	req.AddData(nl.NewRtAttr(unix.IFLA_MASTER, nl.Uint32Attr(0)))
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil && !isNotFound(err) {
		return fmt.Errorf("detach %s: %w", name, err)
	}
	return nil
}

// detached reports whether a link is in the state detachLink leaves it:
// down and on no bridge.
func detached(l netlink.Link) bool {
	return l.Attrs().Flags&net.FlagUp == 0 && l.Attrs().MasterIndex == 0
}

// ReservedHostVeths is the set of host veth names of rs's attachments.
func ReservedHostVeths(rs []ipam.Reservation) map[string]bool {
	out := make(map[string]bool, len(rs))
	for _, r := range rs {
		out[HostVethName(r.ContainerID, r.IfName)] = true
	}
	return out
}

// SweepHostVeths deletes, in the calling thread's network namespace, every
// veth named with knit's host prefix that is detached (down, on no bridge)
// and not in reserved (ReservedHostVeths of the store's reservations): the
// host ends DEL cut off whose pod namespace was never removed. ADD creates
// its veth up and on the bridge in one request, after reserving, so a pod
// being set up is never swept. It returns the names it deleted.
func SweepHostVeths(reserved map[string]bool) ([]string, error) {
	links, err := netlinksafe.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var deleted []string
	var errs []error
	for _, l := range links {
		name := l.Attrs().Name
		if _, ok := l.(*netlink.Veth); !ok || !strings.HasPrefix(name, hostVethPrefix) || reserved[name] || !detached(l) {
			continue
		}
		if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("delete detached %s: %w", name, err))
			continue
		}
		deleted = append(deleted, name)
	}
	return deleted, errors.Join(errs...)
}

// bridgeUp checks that the node bridge exists and is up: without it, every
// pod of the node is cut off.
func bridgeUp(name string) error {
	l, err := netlinksafe.LinkByName(name)
	if isNotFound(err) {
		return fmt.Errorf("bridge %s is missing: pods on this node have no connectivity", name)
	}
	if err != nil {
		return fmt.Errorf("bridge %s: %w", name, err)
	}
	if _, ok := l.(*netlink.Bridge); !ok {
		return fmt.Errorf("bridge %s: is a %s, not a bridge", name, l.Type())
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("bridge %s is down: pods on this node have no connectivity", name)
	}
	return nil
}

// checkPod verifies what ADD built for one attachment: bridge, host veth on
// it (with hairpin), its peer in the pod namespace with the expected MAC,
// up, with the result's addresses and routes.
func checkPod(node *NodeConfig, netnsPath, ifName, hostName, mac string, ips []*current.IPConfig, routes []*types.Route) error {
	if err := bridgeUp(node.Bridge); err != nil {
		return err
	}
	br, err := netlinksafe.LinkByName(node.Bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", node.Bridge, err)
	}
	host, err := netlinksafe.LinkByName(hostName)
	if err != nil {
		return fmt.Errorf("host veth %s: %w", hostName, err)
	}
	if _, ok := host.(*netlink.Veth); !ok {
		return fmt.Errorf("host veth %s: is a %s, not a veth", hostName, host.Type())
	}
	if detached(host) {
		return fmt.Errorf("host veth %s: down and on no bridge (DEL already ran for this attachment)", hostName)
	}
	if host.Attrs().MasterIndex != br.Attrs().Index {
		return fmt.Errorf("host veth %s: not a port of bridge %s", hostName, node.Bridge)
	}
	if node.Hairpin {
		pi, err := netlinksafe.LinkGetProtinfo(host)
		if err != nil {
			return fmt.Errorf("host veth %s: read bridge port settings: %w", hostName, err)
		}
		if !pi.Hairpin {
			return fmt.Errorf("host veth %s: hairpin mode is off", hostName)
		}
	}
	podNS, err := ns.GetNS(netnsPath)
	if err != nil {
		return &netnsError{path: netnsPath, err: err}
	}
	defer podNS.Close()
	return podNS.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("interface %s in netns %s: %w", ifName, netnsPath, err)
		}
		if _, ok := l.(*netlink.Veth); !ok {
			return fmt.Errorf("interface %s: is a %s, not a veth", ifName, l.Type())
		}
		if l.Attrs().Index != host.Attrs().ParentIndex || l.Attrs().ParentIndex != host.Attrs().Index {
			return fmt.Errorf("interface %s: not the peer of host veth %s", ifName, hostName)
		}
		if mac != "" && !strings.EqualFold(mac, l.Attrs().HardwareAddr.String()) {
			return fmt.Errorf("interface %s: MAC %s, prevResult says %s", ifName, l.Attrs().HardwareAddr, mac)
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("interface %s: down", ifName)
		}
		if err := ip.ValidateExpectedInterfaceIPs(ifName, ips); err != nil {
			return fmt.Errorf("interface %s: %w", ifName, err)
		}
		if err := ip.ValidateExpectedRoute(routes); err != nil {
			return fmt.Errorf("interface %s: %w", ifName, err)
		}
		return nil
	})
}
