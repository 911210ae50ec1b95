package cluster

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// Why close connections by local address: one HTTP/2 connection carries
// every watch of the agent, for as long as the process runs. When the
// node's address changes (a DHCP lease renewed to another address, a link
// moved), a connection from the old address is dead but nothing says so:
// no reset ever arrives, and client-go finds out only through its HTTP/2
// health check, after 30 s without a frame plus a 15 s ping timeout. Until
// then the agent sees no change, not even its own Node's new InternalIP,
// and its peers keep sending to the old address. The tracker closes such a
// connection as soon as its local address is gone; client-go then dials
// again, from the address the node has now.

// The node's addresses are compared with the API connections' local
// addresses whenever the kernel reports an address deleted (rtnetlink), and
// on a slow timer besides (a lost event costs at most that long). Without
// the subscription the timer is fast: one address dump a second.
const (
	localAddrPoll     = time.Second
	localAddrFallback = 30 * time.Second
)

// connTracker dials the API connections and remembers them until closed.
type connTracker struct {
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

func newConnTracker(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *connTracker {
	if dial == nil {
		// client-go's own dialer settings.
		dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	return &connTracker{dial: dial, conns: map[*trackedConn]struct{}{}}
}

// trackedConn is a connection the tracker may close.
type trackedConn struct {
	net.Conn
	local netip.Addr
	t     *connTracker
}

func (c *trackedConn) Close() error {
	c.t.mu.Lock()
	delete(c.t.conns, c)
	c.t.mu.Unlock()
	return c.Conn.Close()
}

// DialContext dials and tracks the connection (IP connections only).
func (t *connTracker) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := t.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	local := ipOf(c.LocalAddr())
	if !local.IsValid() {
		return c, nil
	}
	tc := &trackedConn{Conn: c, local: local, t: t}
	t.mu.Lock()
	t.conns[tc] = struct{}{}
	t.mu.Unlock()
	return tc, nil
}

// closeOrphans closes every tracked connection whose local address have
// rejects and returns those addresses.
func (t *connTracker) closeOrphans(have func(netip.Addr) bool) []netip.Addr {
	t.mu.Lock()
	var orphans []*trackedConn
	for c := range t.conns {
		if !have(c.local) {
			orphans = append(orphans, c)
		}
	}
	t.mu.Unlock()
	var gone []netip.Addr
	for _, c := range orphans {
		_ = c.Close()
		gone = append(gone, c.local)
	}
	return gone
}

// watch closes, until ctx is done, the connections whose local address no
// interface holds any more: checked on every signal of changed (nil: none)
// and every poll.
func (t *connTracker) watch(ctx context.Context, addrs func() ([]net.Addr, error), changed <-chan struct{}, poll time.Duration, log *slog.Logger) {
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case _, ok := <-changed:
			if !ok {
				if ctx.Err() != nil {
					return // shutting down: the subscription ended with ctx
				}
				// The event subscription broke: poll as if there had
				// never been one.
				log.Warn("address events stopped; polling local addresses", "every", localAddrPoll)
				changed = nil
				tick.Reset(localAddrPoll)
			}
		}
		t.mu.Lock()
		idle := len(t.conns) == 0
		t.mu.Unlock()
		if idle {
			continue
		}
		list, err := addrs()
		if err != nil {
			continue // nothing known: close nothing
		}
		have := make(map[netip.Addr]bool, len(list))
		for _, a := range list {
			if ip := ipOf(a); ip.IsValid() {
				have[ip] = true
			}
		}
		if gone := t.closeOrphans(func(a netip.Addr) bool { return have[a] }); len(gone) > 0 {
			log.Warn("closed API connections from an address this node no longer has; reconnecting from its current one",
				"addresses", gone)
		}
	}
}

// ipOf is the IP of a TCP/UDP/IP address, unmapped; invalid otherwise.
func ipOf(a net.Addr) netip.Addr {
	var ip net.IP
	switch a := a.(type) {
	case *net.TCPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	case *net.IPNet:
		ip = a.IP
	case *net.IPAddr:
		ip = a.IP
	default:
		return netip.Addr{}
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}
	}
	return addr.Unmap()
}

// addrDeletions signals (coalesced) every address the kernel deletes in
// this network namespace, until ctx is done; nil when it cannot subscribe.
func addrDeletions(ctx context.Context, log *slog.Logger) <-chan struct{} {
	updates := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(updates, ctx.Done(), netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) { log.Warn("address event subscription failed", "err", err) },
	}); err != nil {
		log.Warn("cannot subscribe to address events; polling local addresses every second", "err", err)
		return nil
	}
	out := make(chan struct{}, 1)
	go func() {
		// netlink closes updates when the subscription ends (ctx done,
		// or a socket error): closing out tells the watch to poll.
		defer close(out)
		for u := range updates {
			if !u.NewAddr {
				select {
				case out <- struct{}{}:
				default:
				}
			}
		}
	}()
	return out
}
