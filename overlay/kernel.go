package overlay

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// kernel is every netlink call the overlay makes. The reconciler depends on
// this interface only, so its diff is unit-tested against fakeKernel; the
// real implementation is a netlink.Handle bound to one network namespace.
//
// The List calls are dumps: implementations retry them when the kernel
// reports the dump was interrupted by a concurrent change (see retryDump).
type kernel interface {
	// LinkByName returns an error wrapping errNoLink if there is no such link.
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetUp(link netlink.Link) error
	LinkSetMTU(link netlink.Link, mtu int) error
	LinkSetHardwareAddr(link netlink.Link, mac net.HardwareAddr) error

	// AddrList lists addresses of one family; link nil means every link.
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrAdd(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error

	RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error)
	RouteReplace(route *netlink.Route) error
	RouteDel(route *netlink.Route) error

	// NeighList lists one link's neighbours of one family; AF_BRIDGE lists
	// the link's forwarding database (for VXLAN: MAC -> remote VTEP).
	NeighList(linkIndex, family int) ([]netlink.Neigh, error)
	NeighSet(neigh *netlink.Neigh) error
	NeighDel(neigh *netlink.Neigh) error

	Close()
}

// errNoLink is what LinkByName returns (wrapped) for a missing link.
var errNoLink = errors.New("no such link")

// dumpAttempts bounds the retries of one interrupted dump.
const dumpAttempts = 5

// retryDump runs a netlink dump until it is not interrupted.
//
// The kernel flags a dump NLM_F_DUMP_INTR when the table changed while it was
// being read; vishvananda/netlink then returns ErrDumpInterrupted with
// possibly incomplete results. containernetworking/plugins' netlinksafe
// retries too, but after its last attempt it returns the partial result as if
// it were whole. A reconciler must not do that: an entry missing from an
// incomplete dump would be re-added (harmless), but a stale view could also
// hide an entry we then fail to delete, or make us act on half a table. So
// after the last attempt the error is returned and the sync is retried as a
// whole.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpAttempts {
		var out []T
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, fmt.Errorf("netlink dump interrupted %d times in a row: %w", dumpAttempts, err)
}

// netlinkKernel is the real kernel: a netlink handle whose sockets were
// opened in one network namespace and stay bound to it.
type netlinkKernel struct {
	h  *netlink.Handle
	ns *netns.NsHandle // the namespace for subscriptions; nil: the caller's
}

// newNetlinkKernel opens netlink sockets in the calling thread's network
// namespace.
func newNetlinkKernel() (*netlinkKernel, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	return &netlinkKernel{h: h}, nil
}

// newNetlinkKernelAt opens netlink sockets in the given network namespace
// (tests use it to drive one node netns from the test process).
func newNetlinkKernelAt(ns netns.NsHandle) (*netlinkKernel, error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	dup, err := netns.GetFromPath(fmt.Sprintf("/proc/self/fd/%d", int(ns)))
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("netns handle: %w", err)
	}
	return &netlinkKernel{h: h, ns: &dup}, nil
}

func (k *netlinkKernel) Close() {
	k.h.Close()
	if k.ns != nil {
		k.ns.Close()
	}
}

func (k *netlinkKernel) LinkByName(name string) (netlink.Link, error) {
	// LinkByName falls back to a link dump on old kernels; retry like one.
	var l netlink.Link
	var err error
	for range dumpAttempts {
		if l, err = k.h.LinkByName(name); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, fmt.Errorf("%w: %s", errNoLink, name)
	}
	return l, err
}

func (k *netlinkKernel) LinkByIndex(index int) (netlink.Link, error) { return k.h.LinkByIndex(index) }
func (k *netlinkKernel) LinkAdd(link netlink.Link) error             { return k.h.LinkAdd(link) }
func (k *netlinkKernel) LinkDel(link netlink.Link) error             { return k.h.LinkDel(link) }
func (k *netlinkKernel) LinkSetUp(link netlink.Link) error           { return k.h.LinkSetUp(link) }
func (k *netlinkKernel) LinkSetMTU(link netlink.Link, mtu int) error {
	return k.h.LinkSetMTU(link, mtu)
}
func (k *netlinkKernel) LinkSetHardwareAddr(link netlink.Link, mac net.HardwareAddr) error {
	return k.h.LinkSetHardwareAddr(link, mac)
}

func (k *netlinkKernel) AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	return retryDump(func() ([]netlink.Addr, error) { return k.h.AddrList(link, family) })
}
func (k *netlinkKernel) AddrAdd(link netlink.Link, a *netlink.Addr) error {
	return k.h.AddrAdd(link, a)
}
func (k *netlinkKernel) AddrDel(link netlink.Link, a *netlink.Addr) error {
	return k.h.AddrDel(link, a)
}

func (k *netlinkKernel) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return retryDump(func() ([]netlink.Route, error) { return k.h.RouteListFiltered(family, filter, mask) })
}
func (k *netlinkKernel) RouteReplace(r *netlink.Route) error { return k.h.RouteReplace(r) }
func (k *netlinkKernel) RouteDel(r *netlink.Route) error     { return k.h.RouteDel(r) }

func (k *netlinkKernel) NeighList(linkIndex, family int) ([]netlink.Neigh, error) {
	return retryDump(func() ([]netlink.Neigh, error) { return k.h.NeighList(linkIndex, family) })
}
func (k *netlinkKernel) NeighSet(n *netlink.Neigh) error { return k.h.NeighSet(n) }
func (k *netlinkKernel) NeighDel(n *netlink.Neigh) error { return k.h.NeighDel(n) }
