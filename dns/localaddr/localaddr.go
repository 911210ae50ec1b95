// Package localaddr makes the cluster DNS Service IP a local address of the
// node: a dummy link holding it as /32 (IPv6: /128), the NodeLocal DNSCache
// technique. The kernel then delivers packets sent to that IP to a socket
// bound to it on this same node, whichever node the sender runs on.
//
// On kernels built without the dummy driver (LinkAdd fails with
// EOPNOTSUPP: small edge images, and the VM the lab runs in) the addresses
// go on lo instead: an address there is just as local to the routing
// decision, and nobody removes lo.
//
// Ensure is idempotent (an existing link and existing addresses are kept)
// and nothing here ever removes the link or its addresses: DNS must keep
// working while the agent restarts.
package localaddr

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Ensure creates the dummy link name if it is missing (lo stands in when
// the kernel has no dummy driver), sets it up, and adds
// every address in ips as a host route (/32 or /128) unless already there.
// IPv6 addresses are added without duplicate address detection, so that
// they can be bound at once.
func Ensure(name string, ips []netip.Addr) error {
	link, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		d := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: name}}
		err := netlink.LinkAdd(d)
		if errors.Is(err, unix.EOPNOTSUPP) {
			// Kernels built without the dummy driver (common on small
			// edge images, and in this lab's VM) still have lo: an address
			// there is just as local, and lo is never removed by anyone.
			link, err = netlink.LinkByName("lo")
			if err != nil {
				return fmt.Errorf("find link lo: %w", err)
			}
			break
		}
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add dummy link %s: %w", name, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("find link %s: %w", name, err)
		}
	case err != nil:
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if link.Type() != "dummy" && link.Attrs().Name != "lo" {
		return fmt.Errorf("link %s exists and is a %s, not a dummy", name, link.Type())
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up: %w", name, err)
		}
	}
	have, err := addrs(link)
	if err != nil {
		return err
	}
	for _, ip := range ips {
		ip = ip.Unmap()
		if have[ip] {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())}}
		if ip.Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add %s to %s: %w", ip, name, err)
		}
	}
	return nil
}

// addrs lists the link's addresses, retrying an interrupted dump.
func addrs(link netlink.Link) (map[netip.Addr]bool, error) {
	var list []netlink.Addr
	var err error
	for range 5 {
		list, err = netlink.AddrList(link, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	out := make(map[netip.Addr]bool, len(list))
	for _, a := range list {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}
