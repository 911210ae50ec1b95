package overlay

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeKernel is an in-memory kernel with the semantics the reconciler
// relies on: replace keys for routes (table, dst, priority), neighbours
// (link, family, IP) and VXLAN FDB entries (link, MAC; a replace moves the
// MAC to the new remote), and a link delete takes its addresses, routes and
// entries with it. Every mutating call is logged in calls.
type fakeKernel struct {
	mu     sync.Mutex
	links  map[int]netlink.Link
	addrs  []netlink.Addr
	routes []netlink.Route
	neighs []netlink.Neigh
	next   int
	calls  []string
	// interrupt makes the next n route dumps fail with ErrDumpInterrupted.
	interrupt int
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{links: map[int]netlink.Link{}, next: 1}
}

// addUnderlay adds an up link holding the given addresses (CIDR notation).
func (k *fakeKernel) addUnderlay(name string, mtu int, cidrs ...string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	idx := k.next
	k.next++
	k.links[idx] = &netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: name, Index: idx, MTU: mtu, Flags: net.FlagUp}}
	for _, c := range cidrs {
		p := netip.MustParsePrefix(c)
		k.addrs = append(k.addrs, netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}, LinkIndex: idx})
	}
	return idx
}

func (k *fakeKernel) log(format string, args ...any) {
	k.calls = append(k.calls, fmt.Sprintf(format, args...))
}

// takeCalls returns and clears the call log.
func (k *fakeKernel) takeCalls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := k.calls
	k.calls = nil
	return c
}

func (k *fakeKernel) dumpErr() error {
	if k.interrupt > 0 {
		k.interrupt--
		return netlink.ErrDumpInterrupted
	}
	return nil
}

func (k *fakeKernel) byName(name string) (int, netlink.Link) {
	for i, l := range k.links {
		if l.Attrs().Name == name {
			return i, l
		}
	}
	return 0, nil
}

func copyLink(l netlink.Link) netlink.Link {
	switch v := l.(type) {
	case *netlink.Vxlan:
		c := *v
		return &c
	case *netlink.Device:
		c := *v
		return &c
	}
	panic(fmt.Sprintf("fake kernel: link type %T", l))
}

func (k *fakeKernel) Close() {}

func (k *fakeKernel) LinkByName(name string) (netlink.Link, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, l := k.byName(name); l != nil {
		return copyLink(l), nil
	}
	return nil, fmt.Errorf("%w: %s", errNoLink, name)
}

func (k *fakeKernel) LinkByIndex(i int) (netlink.Link, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if l, ok := k.links[i]; ok {
		return copyLink(l), nil
	}
	return nil, unix.ENODEV
}

func (k *fakeKernel) LinkAdd(l netlink.Link) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("LinkAdd %s", linkString(l))
	if _, have := k.byName(l.Attrs().Name); have != nil {
		return unix.EEXIST
	}
	c := copyLink(l)
	a := c.Attrs()
	a.Index = k.next
	k.next++
	if a.MTU == 0 {
		a.MTU = 1500
	}
	if a.HardwareAddr == nil {
		a.HardwareAddr = net.HardwareAddr{0x02, 0, 0, 0, 0, byte(a.Index)}
	}
	a.Flags = 0
	k.links[a.Index] = c
	return nil
}

func (k *fakeKernel) LinkDel(l netlink.Link) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("LinkDel %s", l.Attrs().Name)
	idx := l.Attrs().Index
	if _, ok := k.links[idx]; !ok {
		return unix.ENODEV
	}
	delete(k.links, idx)
	k.addrs = slices.DeleteFunc(k.addrs, func(a netlink.Addr) bool { return a.LinkIndex == idx })
	k.routes = slices.DeleteFunc(k.routes, func(r netlink.Route) bool { return r.LinkIndex == idx })
	k.neighs = slices.DeleteFunc(k.neighs, func(n netlink.Neigh) bool { return n.LinkIndex == idx })
	return nil
}

func (k *fakeKernel) setLink(l netlink.Link, what string, fn func(a *netlink.LinkAttrs)) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("LinkSet %s %s", l.Attrs().Name, what)
	have, ok := k.links[l.Attrs().Index]
	if !ok {
		return unix.ENODEV
	}
	fn(have.Attrs())
	return nil
}

func (k *fakeKernel) LinkSetUp(l netlink.Link) error {
	return k.setLink(l, "up", func(a *netlink.LinkAttrs) { a.Flags |= net.FlagUp })
}

func (k *fakeKernel) LinkSetMTU(l netlink.Link, mtu int) error {
	return k.setLink(l, fmt.Sprintf("mtu %d", mtu), func(a *netlink.LinkAttrs) { a.MTU = mtu })
}

func (k *fakeKernel) LinkSetHardwareAddr(l netlink.Link, mac net.HardwareAddr) error {
	return k.setLink(l, "address "+mac.String(), func(a *netlink.LinkAttrs) { a.HardwareAddr = mac })
}

func ipFamily(ip net.IP) int {
	if ip.To4() != nil {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func (k *fakeKernel) AddrList(l netlink.Link, family int) ([]netlink.Addr, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []netlink.Addr
	for _, a := range k.addrs {
		if (l == nil || a.LinkIndex == l.Attrs().Index) && ipFamily(a.IP) == family {
			out = append(out, a)
		}
	}
	return out, nil
}

func (k *fakeKernel) AddrAdd(l netlink.Link, a *netlink.Addr) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("AddrAdd %s %s", l.Attrs().Name, a.IPNet)
	for _, h := range k.addrs {
		if h.LinkIndex == l.Attrs().Index && h.Equal(*a) {
			return unix.EEXIST
		}
	}
	c := *a
	c.LinkIndex = l.Attrs().Index
	if c.IP.IsLinkLocalUnicast() {
		c.Scope = int(netlink.SCOPE_LINK)
	}
	k.addrs = append(k.addrs, c)
	return nil
}

func (k *fakeKernel) AddrDel(l netlink.Link, a *netlink.Addr) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("AddrDel %s %s", l.Attrs().Name, a.IPNet)
	n := len(k.addrs)
	k.addrs = slices.DeleteFunc(k.addrs, func(h netlink.Addr) bool { return h.LinkIndex == l.Attrs().Index && h.Equal(*a) })
	if len(k.addrs) == n {
		return unix.EADDRNOTAVAIL
	}
	return nil
}

func (k *fakeKernel) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.dumpErr(); err != nil {
		return nil, err
	}
	var out []netlink.Route
	for _, r := range k.routes {
		switch {
		case r.Family != family:
		case mask&netlink.RT_FILTER_PROTOCOL != 0 && r.Protocol != filter.Protocol:
		case mask&netlink.RT_FILTER_TABLE != 0 && r.Table != filter.Table:
		default:
			out = append(out, r)
		}
	}
	return out, nil
}

func sameRouteKey(a, b *netlink.Route) bool {
	return a.Family == b.Family && a.Table == b.Table && a.Priority == b.Priority && a.Dst.String() == b.Dst.String()
}

func (k *fakeKernel) RouteReplace(r *netlink.Route) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("RouteReplace %s", routeString(k, r))
	if _, ok := k.links[r.LinkIndex]; !ok {
		return unix.ENODEV
	}
	c := *r
	if c.Table == 0 {
		c.Table = unix.RT_TABLE_MAIN
	}
	if c.Family == 0 {
		c.Family = ipFamily(c.Dst.IP)
	}
	for i := range k.routes {
		if sameRouteKey(&k.routes[i], &c) {
			k.routes[i] = c
			return nil
		}
	}
	k.routes = append(k.routes, c)
	return nil
}

func (k *fakeKernel) RouteDel(r *netlink.Route) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("RouteDel %s", routeString(k, r))
	n := len(k.routes)
	k.routes = slices.DeleteFunc(k.routes, func(h netlink.Route) bool { return sameRouteKey(&h, r) })
	if len(k.routes) == n {
		return unix.ESRCH
	}
	return nil
}

func (k *fakeKernel) NeighList(linkIndex, family int) ([]netlink.Neigh, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []netlink.Neigh
	for _, n := range k.neighs {
		if n.LinkIndex == linkIndex && n.Family == family {
			out = append(out, n)
		}
	}
	return out, nil
}

func sameNeigh(a, b *netlink.Neigh, matchIP bool) bool {
	if a.LinkIndex != b.LinkIndex || a.Family != b.Family {
		return false
	}
	if a.Family == unix.AF_BRIDGE {
		return a.HardwareAddr.String() == b.HardwareAddr.String() && (!matchIP || a.IP.Equal(b.IP))
	}
	return a.IP.Equal(b.IP)
}

func (k *fakeKernel) NeighSet(n *netlink.Neigh) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("NeighSet %s", neighString(k, n))
	if _, ok := k.links[n.LinkIndex]; !ok {
		return unix.ENODEV
	}
	for i := range k.neighs {
		if sameNeigh(&k.neighs[i], n, false) {
			k.neighs[i] = *n
			return nil
		}
	}
	k.neighs = append(k.neighs, *n)
	return nil
}

func (k *fakeKernel) NeighDel(n *netlink.Neigh) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.log("NeighDel %s", neighString(k, n))
	c := len(k.neighs)
	k.neighs = slices.DeleteFunc(k.neighs, func(h netlink.Neigh) bool { return sameNeigh(&h, n, true) })
	if len(k.neighs) == c {
		return unix.ENOENT
	}
	return nil
}

func (k *fakeKernel) linkName(i int) string {
	if l, ok := k.links[i]; ok {
		return l.Attrs().Name
	}
	return fmt.Sprintf("if%d", i)
}

func linkString(l netlink.Link) string {
	a := l.Attrs()
	s := fmt.Sprintf("%s mtu %d", a.Name, a.MTU)
	if vx, ok := l.(*netlink.Vxlan); ok {
		s = fmt.Sprintf("%s vxlan vni %d port %d local %s link %d learning %v", s, vx.VxlanId, vx.Port, vx.SrcAddr, vx.VtepDevIndex, vx.Learning)
	}
	if a.HardwareAddr != nil {
		s += " address " + a.HardwareAddr.String()
	}
	if a.Flags&net.FlagUp != 0 {
		s += " up"
	}
	return s
}

func routeString(k *fakeKernel, r *netlink.Route) string {
	s := r.Dst.String()
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	s += " dev " + k.linkName(r.LinkIndex)
	if r.Flags&unix.RTNH_F_ONLINK != 0 {
		s += " onlink"
	}
	if r.Protocol != 0 {
		s += fmt.Sprintf(" proto %d", r.Protocol)
	}
	if r.Priority != 0 {
		s += fmt.Sprintf(" metric %d", r.Priority)
	}
	return s
}

func neighString(k *fakeKernel, n *netlink.Neigh) string {
	if n.Family == unix.AF_BRIDGE {
		return fmt.Sprintf("fdb %s dev %s dst %s", n.HardwareAddr, k.linkName(n.LinkIndex), n.IP)
	}
	s := fmt.Sprintf("%s dev %s", n.IP, k.linkName(n.LinkIndex))
	if n.HardwareAddr != nil {
		s += " lladdr " + n.HardwareAddr.String()
	}
	if n.State&netlink.NUD_PERMANENT != 0 {
		s += " permanent"
	}
	return s
}

// state is the whole fake kernel as sorted lines, like `ip` would print it.
func (k *fakeKernel) state() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var lines []string
	for _, l := range k.links {
		lines = append(lines, "link "+linkString(l))
	}
	for _, a := range k.addrs {
		lines = append(lines, fmt.Sprintf("addr %s %s", k.linkName(a.LinkIndex), a.IPNet))
	}
	for i := range k.routes {
		lines = append(lines, "route "+routeString(k, &k.routes[i]))
	}
	for i := range k.neighs {
		lines = append(lines, "neigh "+neighString(k, &k.neighs[i]))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
