package doctor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/proxy"
)

// knitRouteProtocol tags the overlay's routes (package overlay).
const knitRouteProtocol = 75

// NFTables reads the proxy's table with the nft binary.
type NFTables struct {
	nft knftables.Interface
}

// NewNFTables opens the knit-proxy table for reading.
func NewNFTables() (*NFTables, error) {
	nft, err := knftables.New(knftables.InetFamily, proxy.TableName)
	if err != nil {
		return nil, err
	}
	return &NFTables{nft: nft}, nil
}

// Elements implements Tables.
func (t *NFTables) Elements(ctx context.Context, name string) ([]*knftables.Element, error) {
	return t.nft.ListElements(ctx, "map", name)
}

// ChainRules implements Tables: knftables lists rules without their text,
// so this asks nft for the chain as text.
func (t *NFTables) ChainRules(ctx context.Context, chain string) ([]string, bool, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "nft", "list", "chain", "inet", proxy.TableName, chain)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if strings.Contains(stderr.String(), "No such file or directory") {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("nft list chain: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	var rules []string
	in := false
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "chain "):
			in = true
		case line == "}" || line == "":
		case in && !strings.HasPrefix(line, "type "):
			rules = append(rules, line)
		}
	}
	return rules, true, nil
}

// Netlink is Net on the node's own network namespace.
type Netlink struct {
	Bridge string // the pod bridge, "cni0"
}

// Route implements Net.
func (n Netlink) Route(ip netip.Addr) RouteCheck {
	rc := RouteCheck{}
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	var actual *netlink.Route
	if rs, err := netlink.RouteGet(net.IP(ip.AsSlice())); err == nil && len(rs) > 0 {
		rc.Actual, actual = describeRoute(rs[0]), &rs[0]
	} else if err != nil {
		rc.Actual = "no route: " + err.Error()
	}
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Protocol: knitRouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		rc.Error = err.Error()
		return rc
	}
	best := -1
	for i, r := range routes {
		if r.Dst == nil {
			continue
		}
		p, ok := netipPrefix(r.Dst)
		if !ok || !p.Contains(ip) {
			continue
		}
		if best < 0 || p.Bits() > prefixBits(routes[best].Dst) {
			best = i
		}
	}
	if best < 0 {
		return rc
	}
	r := routes[best]
	rc.Knit = true
	rc.Dst = r.Dst.String()
	if r.Gw != nil {
		rc.Gateway = r.Gw.String()
	}
	link, err := netlink.LinkByIndex(r.LinkIndex)
	if err != nil {
		rc.Error = err.Error()
		return rc
	}
	rc.Dev = link.Attrs().Name
	if actual != nil && (actual.LinkIndex != r.LinkIndex || (r.Gw != nil && !r.Gw.Equal(actual.Gw))) {
		rc.Shadowed = true
	}
	if link.Type() != "vxlan" || r.Gw == nil {
		return rc
	}
	var mac net.HardwareAddr
	neighOK, fdbOK := false, false
	if ns, err := netlink.NeighList(r.LinkIndex, fam); err == nil {
		for _, nb := range ns {
			if nb.IP.Equal(r.Gw) && nb.State&netlink.NUD_PERMANENT != 0 {
				neighOK, mac = true, nb.HardwareAddr
			}
		}
	}
	if mac != nil {
		if ns, err := netlink.NeighList(r.LinkIndex, unix.AF_BRIDGE); err == nil {
			for _, nb := range ns {
				if bytes.Equal(nb.HardwareAddr, mac) && nb.IP != nil {
					fdbOK = true
				}
			}
		}
	}
	rc.Neigh, rc.FDB = &neighOK, &fdbOK
	return rc
}

func prefixBits(n *net.IPNet) int {
	b, _ := n.Mask.Size()
	return b
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a.Unmap(), prefixBits(n)), true
}

func describeRoute(r netlink.Route) string {
	var b strings.Builder
	if r.Gw != nil {
		b.WriteString("via " + r.Gw.String() + " ")
	}
	if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
		b.WriteString("dev " + l.Attrs().Name)
	}
	return strings.TrimSpace(b.String())
}

// Links implements Net.
func (n Netlink) Links() ([]Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var out []Link
	underlay := map[int]bool{}
	for _, l := range links {
		a := l.Attrs()
		switch {
		case l.Type() == "vxlan" && strings.HasPrefix(a.Name, "knit-"):
			out = append(out, Link{Name: a.Name, Role: RoleVXLAN, MTU: a.MTU})
			if v, ok := l.(*netlink.Vxlan); ok && v.VtepDevIndex > 0 {
				underlay[v.VtepDevIndex] = true
			}
		case a.Name == n.Bridge:
			out = append(out, Link{Name: a.Name, Role: RoleBridge, MTU: a.MTU})
		}
	}
	if len(underlay) == 0 {
		// No VXLAN device (direct routing): the default route's link.
		if rs, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: nil}, 0); err == nil {
			for _, r := range rs {
				if r.Dst == nil && r.LinkIndex > 0 {
					underlay[r.LinkIndex] = true
				}
			}
		}
	}
	for _, l := range links {
		if underlay[l.Attrs().Index] {
			out = append(out, Link{Name: l.Attrs().Name, Role: RoleUnderlay, MTU: l.Attrs().MTU})
		}
	}
	return out, nil
}

// RouteMTU implements Net.
func (n Netlink) RouteMTU(ip netip.Addr) (int, error) {
	rs, err := netlink.RouteGet(net.IP(ip.AsSlice()))
	if err != nil {
		return 0, err
	}
	if len(rs) == 0 {
		return 0, errors.New("no route")
	}
	l, err := netlink.LinkByIndex(rs[0].LinkIndex)
	if err != nil {
		return 0, err
	}
	mtu := l.Attrs().MTU
	if rs[0].MTU > 0 && rs[0].MTU < mtu {
		mtu = rs[0].MTU
	}
	return mtu, nil
}

// mtuProbePort is where MTU probes go: a port nothing should listen on,
// so the pod's kernel answers ICMP port unreachable (traceroute's).
const mtuProbePort = 33434

// ProbeMTU implements Net: a connected UDP socket with Don't Fragment
// sends size bytes (IP packet); ICMP port unreachable comes back as
// ECONNREFUSED on the next read, which proves the datagram arrived.
func (n Netlink) ProbeMTU(ctx context.Context, ip netip.Addr, size int) (bool, error) {
	level, opt, val, hdr := unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO, 28
	if ip.Is6() {
		level, opt, val, hdr = unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DO, 48
	}
	var serr error
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, val) }); err != nil {
			return err
		}
		return serr
	}}
	conn, err := d.DialContext(ctx, "udp", netip.AddrPortFrom(ip, mtuProbePort).String())
	if err != nil {
		return false, err
	}
	defer conn.Close()
	if size < hdr+1 {
		size = hdr + 1
	}
	if _, err := conn.Write(make([]byte, size-hdr)); err != nil {
		if errors.Is(err, syscall.EMSGSIZE) {
			return false, fmt.Errorf("this node's route MTU is below %d bytes", size)
		}
		return false, err
	}
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64)
	_, err = conn.Read(buf)
	if err == nil || errors.Is(err, syscall.ECONNREFUSED) {
		return true, nil
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false, nil
	}
	return false, err
}
