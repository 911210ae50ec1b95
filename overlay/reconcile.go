package overlay

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// reconciler makes the kernel match a desired state: it dumps what is there
// (VXLAN devices and their addresses, FDB and neighbour tables, every route
// tagged routeProtocol), compares, and changes only what differs. An equal
// device, route or entry is never deleted and re-created, so a sync with
// nothing to do makes no netlink changes at all, and an agent restart is
// invisible to traffic.
type reconciler struct {
	k   kernel
	log *slog.Logger
	// changed is called once per kernel change (object: link, addr, fdb,
	// neigh, route; op: add, replace, set, del).
	changed func(object, op string)
}

// discoverUnderlay finds, for each node IP, the interface holding it, its
// on-link prefix and MTU. Node IPs not assigned to any interface are
// reported in the error and left out of the result.
func (r *reconciler) discoverUnderlay(ips []netip.Addr) ([2]underlay, error) {
	var out [2]underlay
	var errs []error
	for _, ip := range ips {
		f := familyOf(ip)
		if out[f].Addr.IsValid() {
			continue // the first address of a family wins
		}
		u, err := r.findUnderlay(ip)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out[f] = u
	}
	return out, errors.Join(errs...)
}

func (r *reconciler) findUnderlay(ip netip.Addr) (underlay, error) {
	f := familyOf(ip)
	addrs, err := r.k.AddrList(nil, f.af())
	if err != nil {
		return underlay{}, fmt.Errorf("list %s addresses: %w", f, err)
	}
	for _, a := range addrs {
		if a.IPNet == nil || toAddr(a.IP) != ip {
			continue
		}
		link, err := r.k.LinkByIndex(a.LinkIndex)
		if err != nil {
			return underlay{}, fmt.Errorf("interface %d holding node IP %s: %w", a.LinkIndex, ip, err)
		}
		ones, _ := a.Mask.Size()
		return underlay{
			Addr:      ip,
			Prefix:    netip.PrefixFrom(ip, ones).Masked(),
			LinkIndex: a.LinkIndex,
			MTU:       link.Attrs().MTU,
		}, nil
	}
	return underlay{}, fmt.Errorf("node IP %s is not assigned to any interface", ip)
}

// apply makes the kernel match d. It carries on past a failed entry so one
// bad entry does not block the others, and returns every failure joined.
func (r *reconciler) apply(d *desired) error {
	var errs []error

	// 1. Devices: remove knit devices no longer wanted (backend changed to
	// direct, an underlay family went away), then create or fix the others.
	wanted := map[string]bool{}
	for _, dev := range d.Devices {
		wanted[dev.Name] = true
	}
	for _, name := range []string{deviceV4, deviceV6} {
		if !wanted[name] {
			errs = append(errs, r.removeDevice(name))
		}
	}
	index := map[string]int{}
	for i := range d.Devices {
		idx, err := r.ensureDevice(&d.Devices[i])
		if err != nil {
			errs = append(errs, fmt.Errorf("device %s: %w", d.Devices[i].Name, err))
			continue
		}
		index[d.Devices[i].Name] = idx
	}

	// 2. FDB and neighbour entries before the routes that use them, so the
	// kernel never has a route to a VTEP it would have to resolve (it
	// could not: learning is off and nothing floods).
	var staleFDB, staleNeigh []netlink.Neigh
	for _, dev := range d.Devices {
		idx, ok := index[dev.Name]
		if !ok {
			continue
		}
		stale, err := r.syncFDB(idx, dev.Name, d.FDB)
		errs = append(errs, err)
		staleFDB = append(staleFDB, stale...)
		stale, err = r.syncNeighs(idx, dev.Name, d.Neighs)
		errs = append(errs, err)
		staleNeigh = append(staleNeigh, stale...)
	}

	// 3. Routes, then 4. the entries only removed routes used.
	errs = append(errs, r.syncRoutes(d.Routes, index))
	for i := range staleNeigh {
		errs = append(errs, r.del("neigh", r.k.NeighDel, &staleNeigh[i]))
	}
	for i := range staleFDB {
		errs = append(errs, r.del("fdb", r.k.NeighDel, &staleFDB[i]))
	}
	return errors.Join(errs...)
}

func (r *reconciler) del(object string, fn func(*netlink.Neigh) error, n *netlink.Neigh) error {
	if err := fn(n); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil // already gone (an FDB replace moved it): the goal is reached
		}
		return fmt.Errorf("delete %s %s %s: %w", object, n.IP, n.HardwareAddr, err)
	}
	r.changed(object, "del")
	return nil
}

func (r *reconciler) removeDevice(name string) error {
	l, err := r.k.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	r.log.Info("removing VXLAN device no longer needed", "device", name)
	if err := r.k.LinkDel(l); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	r.changed("link", "del")
	return nil
}

// ensureDevice creates or fixes one VXLAN device and returns its index.
//
// Transmit checksum offload is deliberately left at the kernel default (on),
// and there is no switch to turn it off. flannel and k3s users are told to
// turn it off (`ethtool -K flannel.1 tx-checksum-ip-generic off`, made to
// stick with a udev rule: flannel #1282, #1929, #2152) when VXLAN traffic
// stalls (the "63 second delay": TCP's SYN retries) or never gets through.
// The offload alone corrupts nothing. What does is NAT of the outer,
// already encapsulated UDP packet on the node that sends it, while the
// inner checksum is still left to the offload: kube-proxy's masquerade
// rule matched on a mark that survives encapsulation, so the VXLAN packet
// was NATed a second time (--random-fully), and the kernel's NAT then wrote
// a wrong UDP checksum, which the receiver drops (kubernetes #88986; that
// kernel bug is fixed in the stable kernels 5.6.13, 5.4.41, 4.19.123 and
// 4.14.181 and later, and kube-proxy PR #92035 clears the mark before
// masquerading). knit removes the trigger instead of paying for the
// workaround, which costs about two thirds of VXLAN throughput (measured in
// the lab: 16.6 -> 5.8 Gbit/s):
//   - knit's proxy clears its mark when it masquerades (proxy/render.go,
//     proxy/iptables_render.go), so no outer packet carries it;
//   - the overlay's own masquerade returns first for VXLAN packets this node
//     sends, and otherwise matches pod sources only, which an outer packet
//     (from the node IP) never has (masq.go);
//   - the kernel tests move TCP through the device with the offload on
//     (TestKernelVXLAN), and check that no VXLAN packet is NATed on its way
//     out (TestKernelAuto).
//
// Left to the host: NAT of this node's VXLAN packets by a rule of someone
// else's (flannel #1929: a node behind NAT that masquerades its own
// outgoing traffic) on a kernel older than those fixes. There the offload
// workaround still helps, by hand; knit does not apply it to every node,
// which would cost every fixed kernel two thirds of its VXLAN throughput.
func (r *reconciler) ensureDevice(d *device) (int, error) {
	l, err := r.k.LinkByName(d.Name)
	if err != nil && !isNotFound(err) {
		return 0, fmt.Errorf("look up: %w", err)
	}
	if err == nil {
		if why := incompatible(l, d); why != "" {
			// VNI, port, local address and underlay link cannot all be
			// changed on a live device; this happens when the node IP moved.
			// The MAC is derived from the node name, so peers' entries stay
			// valid across the re-creation.
			r.log.Warn("re-creating VXLAN device", "device", d.Name, "why", why)
			if err := r.k.LinkDel(l); err != nil {
				return 0, fmt.Errorf("delete incompatible device: %w", err)
			}
			r.changed("link", "del")
			l = nil
		}
	} else {
		l = nil
	}
	if l == nil {
		if err := r.k.LinkAdd(newVxlan(d)); err != nil {
			return 0, fmt.Errorf("create: %w", err)
		}
		r.changed("link", "add")
		r.log.Info("created VXLAN device", "device", d.Name, "vni", d.VNI, "port", d.Port,
			"local", d.Local, "mtu", d.MTU, "mac", d.MAC.String())
		if l, err = r.k.LinkByName(d.Name); err != nil {
			return 0, fmt.Errorf("look up after create: %w", err)
		}
	}
	a := l.Attrs()
	if a.MTU != d.MTU {
		if err := r.k.LinkSetMTU(l, d.MTU); err != nil {
			return 0, fmt.Errorf("set MTU %d: %w", d.MTU, err)
		}
		r.changed("link", "set")
	}
	if !bytes.Equal(a.HardwareAddr, d.MAC) {
		if err := r.k.LinkSetHardwareAddr(l, d.MAC); err != nil {
			return 0, fmt.Errorf("set MAC %s: %w", d.MAC, err)
		}
		r.changed("link", "set")
	}
	if a.Flags&net.FlagUp == 0 {
		if err := r.k.LinkSetUp(l); err != nil {
			return 0, fmt.Errorf("set up: %w", err)
		}
		r.changed("link", "set")
	}
	return a.Index, r.syncAddrs(l, d.Addrs)
}

func newVxlan(d *device) *netlink.Vxlan {
	return &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{
			Name:         d.Name,
			MTU:          d.MTU,
			HardwareAddr: d.MAC,
		},
		VxlanId:      d.VNI,
		VtepDevIndex: d.UnderlayIndex,
		SrcAddr:      net.IP(d.Local.AsSlice()),
		Port:         d.Port,
		// Learning off: every remote MAC is in the FDB from the API, and a
		// learnt entry could only be wrong or redundant.
		Learning: false,
	}
}

// incompatible says why an existing link cannot serve as d, or "".
func incompatible(l netlink.Link, d *device) string {
	vx, ok := l.(*netlink.Vxlan)
	switch {
	case !ok:
		return fmt.Sprintf("link type %s, want vxlan", l.Type())
	case vx.VxlanId != d.VNI:
		return fmt.Sprintf("VNI %d, want %d", vx.VxlanId, d.VNI)
	case vx.Port != d.Port:
		return fmt.Sprintf("port %d, want %d", vx.Port, d.Port)
	case toAddr(vx.SrcAddr) != d.Local:
		return fmt.Sprintf("local address %s, want %s", vx.SrcAddr, d.Local)
	case vx.VtepDevIndex != d.UnderlayIndex:
		return fmt.Sprintf("underlay link %d, want %d", vx.VtepDevIndex, d.UnderlayIndex)
	case vx.Learning:
		return "learning on, want off"
	}
	return ""
}

// syncAddrs makes the device's global addresses exactly want (link-local
// addresses are the kernel's and stay).
func (r *reconciler) syncAddrs(l netlink.Link, want []netip.Prefix) error {
	var errs []error
	have := map[netip.Prefix]bool{}
	for _, f := range families {
		addrs, err := r.k.AddrList(l, f.af())
		if err != nil {
			return fmt.Errorf("list %s addresses: %w", f, err)
		}
		for _, a := range addrs {
			if a.IPNet == nil || a.Scope != int(netlink.SCOPE_UNIVERSE) {
				continue
			}
			p := toPrefix(a.IPNet)
			if slices.Contains(want, p) {
				have[p] = true
				continue
			}
			if err := r.k.AddrDel(l, &a); err != nil {
				errs = append(errs, fmt.Errorf("delete address %s: %w", p, err))
				continue
			}
			r.changed("addr", "del")
		}
	}
	for _, p := range want {
		if have[p] {
			continue
		}
		a := &netlink.Addr{IPNet: toIPNet(p)}
		if p.Addr().Is6() {
			// The address is this node's alone (derived from its podCIDR):
			// skip duplicate address detection, which would hold it
			// "tentative" and unusable as a source for a second or more.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := r.k.AddrAdd(l, a); err != nil {
			errs = append(errs, fmt.Errorf("add address %s: %w", p, err))
			continue
		}
		r.changed("addr", "add")
	}
	return errors.Join(errs...)
}

// syncFDB adds or fixes the device's forwarding entries and returns the
// ones to delete once the routes no longer need them.
func (r *reconciler) syncFDB(idx int, dev string, all []fdbEntry) ([]netlink.Neigh, error) {
	entries, err := r.k.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return nil, fmt.Errorf("list FDB of %s: %w", dev, err)
	}
	key := func(mac net.HardwareAddr, ip netip.Addr) string { return mac.String() + "/" + ip.String() }
	have := map[string]bool{}
	var stale []netlink.Neigh
	want := map[string]bool{}
	for _, e := range all {
		if e.Dev == dev {
			want[key(e.MAC, e.Dst)] = true
		}
	}
	for _, n := range entries {
		// Entries without a remote address are the device's own unicast
		// and multicast filter addresses, listed by the same dump.
		if n.LinkIndex != idx || n.IP == nil {
			continue
		}
		k := key(n.HardwareAddr, toAddr(n.IP))
		if want[k] && n.State&netlink.NUD_PERMANENT != 0 {
			have[k] = true
			continue
		}
		stale = append(stale, netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			IP: n.IP, HardwareAddr: n.HardwareAddr})
	}
	var errs []error
	for _, e := range all {
		if e.Dev != dev || have[key(e.MAC, e.Dst)] {
			continue
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
			Flags: netlink.NTF_SELF, IP: net.IP(e.Dst.AsSlice()), HardwareAddr: e.MAC}
		if err := r.k.NeighSet(n); err != nil {
			errs = append(errs, fmt.Errorf("set FDB %s -> %s on %s: %w", e.MAC, e.Dst, dev, err))
			continue
		}
		r.changed("fdb", "set")
	}
	return stale, errors.Join(errs...)
}

// syncNeighs adds or fixes the device's permanent neighbour entries and
// returns the permanent ones to delete once no route uses them. Entries the
// kernel made itself (not permanent) are left alone.
func (r *reconciler) syncNeighs(idx int, dev string, all []neigh) ([]netlink.Neigh, error) {
	want := map[netip.Addr]net.HardwareAddr{}
	for _, n := range all {
		if n.Dev == dev {
			want[n.IP] = n.MAC
		}
	}
	ok := map[netip.Addr]bool{}
	var stale []netlink.Neigh
	for _, f := range families {
		entries, err := r.k.NeighList(idx, f.af())
		if err != nil {
			return nil, fmt.Errorf("list %s neighbours of %s: %w", f, dev, err)
		}
		for _, n := range entries {
			if n.LinkIndex != idx || n.IP == nil {
				continue
			}
			ip := toAddr(n.IP)
			mac, wanted := want[ip]
			permanent := n.State&netlink.NUD_PERMANENT != 0
			switch {
			case wanted && permanent && bytes.Equal(n.HardwareAddr, mac):
				ok[ip] = true
			case !wanted && permanent:
				stale = append(stale, netlink.Neigh{LinkIndex: idx, Family: f.af(), IP: n.IP})
			}
		}
	}
	var errs []error
	for _, n := range all {
		if n.Dev != dev || ok[n.IP] {
			continue
		}
		nn := &netlink.Neigh{LinkIndex: idx, Family: familyOf(n.IP).af(), State: netlink.NUD_PERMANENT,
			Type: unix.RTN_UNICAST, IP: net.IP(n.IP.AsSlice()), HardwareAddr: n.MAC}
		if err := r.k.NeighSet(nn); err != nil {
			errs = append(errs, fmt.Errorf("set neighbour %s -> %s on %s: %w", n.IP, n.MAC, dev, err))
			continue
		}
		r.changed("neigh", "set")
	}
	return stale, errors.Join(errs...)
}

// syncRoutes makes the set of routeProtocol routes in the main table exactly
// want. index maps VXLAN device names to link indexes; a route over a device
// that could not be set up is neither added nor removed this round.
func (r *reconciler) syncRoutes(want []route, index map[string]int) error {
	var errs []error
	type key struct {
		dst  netip.Prefix
		prio int
	}
	wanted := map[key]*netlink.Route{}
	keep := map[netip.Prefix]bool{} // destinations to leave alone this round
	for _, w := range want {
		link := w.LinkIndex
		if w.Dev != "" {
			idx, ok := index[w.Dev]
			if !ok {
				keep[w.Dst] = true
				continue
			}
			link = idx
		}
		nr := kernelRoute(w, link)
		wanted[key{w.Dst, nr.Priority}] = nr
	}
	for _, f := range families {
		have, err := r.k.RouteListFiltered(f.af(),
			&netlink.Route{Protocol: routeProtocol, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("list %s routes: %w", f, err))
			// Without the current table we cannot tell stale from wanted;
			// adding is still safe, deleting is not.
			for _, nr := range wanted {
				if familyOf(toPrefix(nr.Dst).Addr()) == f {
					keep[toPrefix(nr.Dst)] = true
				}
			}
			continue
		}
		for i := range have {
			h := &have[i]
			if h.Dst == nil {
				continue
			}
			k := key{toPrefix(h.Dst), h.Priority}
			if nr, ok := wanted[k]; ok {
				if routeEqual(h, nr) {
					delete(wanted, k) // already right
				}
				continue // wrong: replaced below, same key
			}
			if keep[k.dst] {
				continue
			}
			if err := r.k.RouteDel(h); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete route %s: %w", k.dst, err))
				continue
			}
			r.changed("route", "del")
		}
	}
	// Replace in a stable order (logs and tests).
	keys := make([]key, 0, len(wanted))
	for k := range wanted {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b key) int { return a.dst.Addr().Compare(b.dst.Addr()) })
	for _, k := range keys {
		nr := wanted[k]
		if err := r.k.RouteReplace(nr); err != nil {
			errs = append(errs, fmt.Errorf("replace route %s via %s: %w", k.dst, nr.Gw, err))
			continue
		}
		r.changed("route", "replace")
	}
	return errors.Join(errs...)
}

// kernelRoute is the netlink form of w over link.
func kernelRoute(w route, link int) *netlink.Route {
	f := familyOf(w.Dst.Addr())
	nr := &netlink.Route{
		Family:    f.af(),
		Dst:       toIPNet(w.Dst),
		Gw:        net.IP(w.Gw.AsSlice()),
		LinkIndex: link,
		Protocol:  routeProtocol,
		Table:     unix.RT_TABLE_MAIN,
		Scope:     netlink.SCOPE_UNIVERSE,
		Type:      unix.RTN_UNICAST,
	}
	if f == v6 {
		// The kernel stores an IPv6 route added with metric 0 as 1024
		// (IP6_RT_PRIO_USER); say so, so the dump compares equal.
		nr.Priority = 1024
	}
	if w.Dev != "" {
		// The gateway is the peer's VTEP address, which is on no local
		// subnet: onlink tells the kernel to resolve it on this device
		// anyway (through the permanent neighbour entry).
		nr.SetFlag(netlink.FLAG_ONLINK)
	}
	return nr
}

func routeEqual(have, want *netlink.Route) bool {
	return have.LinkIndex == want.LinkIndex &&
		toAddr(have.Gw) == toAddr(want.Gw) &&
		have.Flags&unix.RTNH_F_ONLINK == want.Flags&unix.RTNH_F_ONLINK &&
		have.Type == want.Type &&
		have.Scope == want.Scope &&
		have.Src == nil && len(have.MultiPath) == 0 && have.Encap == nil
}

func isNotFound(err error) bool { return errors.Is(err, errNoLink) }

// toAddr converts a net.IP (4 or 16 bytes, IPv4 possibly mapped) to an
// unmapped netip.Addr; the zero Addr for nil.
func toAddr(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func toPrefix(n *net.IPNet) netip.Prefix {
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(toAddr(n.IP), ones).Masked()
}

func toIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
