package overlay

import (
	"context"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Repairs without waiting for the timer. The sync loop is level-triggered:
// any sync diffs the whole desired state against the kernel and puts back
// what is missing. Someone deleting one of knit's routes, neighbour or FDB
// entries, or a VXLAN device (an operator's `ip route flush`, a network
// manager "cleaning up" unknown devices) would otherwise leave pods cut off
// until the next timer resync (SyncPeriod, 30 s by default). The kernel
// announces every such deletion on its rtnetlink multicast groups, so the
// overlay listens and asks for a sync at once. The events are only a
// trigger: what to fix is still decided by the diff, so a lost or
// misread event costs a timer period, never a wrong entry.

// kernelWatcher is implemented by kernels that can report deletions.
type kernelWatcher interface {
	// watch calls deleted (without blocking for long) whenever something
	// the overlay may own is removed, until ctx ends.
	watch(ctx context.Context, deleted func(what string), log *slog.Logger)
}

// watchRetry is the pause before subscribing again after a subscription
// broke (the socket's receive buffer overflowed, say).
const watchRetry = time.Second

func (k *netlinkKernel) watch(ctx context.Context, deleted func(what string), log *slog.Logger) {
	for ctx.Err() == nil {
		k.watchOnce(ctx, deleted, log)
		// A broken subscription may have lost events: sync anyway.
		deleted("subscription")
		select {
		case <-ctx.Done():
		case <-time.After(watchRetry):
		}
	}
}

// watchOnce subscribes to link, route and neighbour updates and reports the
// deletions that concern knit until ctx ends or a subscription breaks.
func (k *netlinkKernel) watchOnce(ctx context.Context, deleted func(what string), log *slog.Logger) {
	done := make(chan struct{})
	defer close(done)
	broken := make(chan struct{}, 1)
	onErr := func(err error) {
		log.Warn("overlay: kernel event subscription failed; resubscribing", "err", err)
		select {
		case broken <- struct{}{}:
		default:
		}
	}
	links := make(chan netlink.LinkUpdate, 64)
	routes := make(chan netlink.RouteUpdate, 64)
	neighs := make(chan netlink.NeighUpdate, 64)
	var ns = k.ns
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: ns, ErrorCallback: onErr}); err != nil {
		onErr(err)
		return
	}
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{Namespace: ns, ErrorCallback: onErr}); err != nil {
		onErr(err)
		return
	}
	if err := netlink.NeighSubscribeWithOptions(neighs, done, netlink.NeighSubscribeOptions{Namespace: ns, ErrorCallback: onErr}); err != nil {
		onErr(err)
		return
	}
	// VXLAN devices' indexes, to recognise their neighbour and FDB
	// entries (deletion messages carry the index, not the name).
	ours := map[int]bool{}
	if ls, err := k.h.LinkList(); err == nil {
		for _, l := range ls {
			if isOurDevice(l.Attrs().Name) {
				ours[l.Attrs().Index] = true
			}
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-broken:
			return
		case u, ok := <-links:
			if !ok {
				return
			}
			name := u.Attrs().Name
			if !isOurDevice(name) {
				continue
			}
			switch {
			case u.Header.Type == unix.RTM_DELLINK:
				delete(ours, int(u.Index))
				deleted("link " + name)
			case u.Flags&unix.IFF_UP == 0:
				ours[int(u.Index)] = true
				deleted("link " + name + " down")
			default:
				ours[int(u.Index)] = true
			}
		case u, ok := <-routes:
			if !ok {
				return
			}
			if u.Type == unix.RTM_DELROUTE && u.Protocol == routeProtocol {
				deleted("route " + u.Dst.String())
			}
		case u, ok := <-neighs:
			if !ok {
				return
			}
			if u.Type == unix.RTM_DELNEIGH && ours[u.LinkIndex] {
				deleted("neighbour " + u.IP.String())
			}
		}
	}
}

func isOurDevice(name string) bool { return name == deviceV4 || name == deviceV6 }
