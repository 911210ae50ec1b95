package cluster

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// loopbackServer accepts connections on 127.0.0.1 and holds them open.
func loopbackServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

func TestConnTrackerCloseOrphans(t *testing.T) {
	addr := loopbackServer(t)
	lo := netip.MustParseAddr("127.0.0.1")
	for _, tc := range []struct {
		name       string
		have       []netip.Addr
		wantClosed bool
	}{
		{"local address still there", []netip.Addr{lo, netip.MustParseAddr("198.18.0.3")}, false},
		{"local address gone", []netip.Addr{netip.MustParseAddr("198.18.0.103")}, true},
		{"no address at all", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newConnTracker(nil)
			c, err := tr.DialContext(context.Background(), "tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			gone := tr.closeOrphans(func(a netip.Addr) bool {
				for _, h := range tc.have {
					if h == a {
						return true
					}
				}
				return false
			})
			if closed := len(gone) == 1 && gone[0] == lo; closed != tc.wantClosed {
				t.Fatalf("closed %v, want closed=%v", gone, tc.wantClosed)
			}
			_, err = c.Write([]byte("x"))
			if gotClosed := errors.Is(err, net.ErrClosed); gotClosed != tc.wantClosed {
				t.Errorf("write after closeOrphans: %v, want closed=%v", err, tc.wantClosed)
			}
			if n := len(tr.conns); tc.wantClosed && n != 0 {
				t.Errorf("%d connections still tracked after being closed", n)
			}
		})
	}
}

// TestConnTrackerForgetsClosed: a connection client-go closes itself is
// no longer tracked.
func TestConnTrackerForgetsClosed(t *testing.T) {
	tr := newConnTracker(nil)
	c, err := tr.DialContext(context.Background(), "tcp", loopbackServer(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.conns) != 1 {
		t.Fatalf("%d tracked, want 1", len(tr.conns))
	}
	c.Close()
	if len(tr.conns) != 0 {
		t.Fatalf("%d tracked after Close, want 0", len(tr.conns))
	}
}

// TestConnTrackerWatch: once the interfaces stop listing the connection's
// local address, the watch closes it: within about one poll, or at once on
// an address-deletion event even when the poll is an hour away.
// TestAddrDeletionsCloses: when the subscription ends, the channel is
// closed, so that the watch knows to poll (it used to stay open and silent).
func TestAddrDeletionsCloses(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := addrDeletions(ctx, slog.New(slog.DiscardHandler))
	if ch == nil {
		t.Skip("cannot subscribe to address events here")
	}
	cancel()
	select {
	case _, ok := <-ch:
		for ok {
			_, ok = <-ch
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel still open 5 s after the subscription ended")
	}
}

func TestConnTrackerWatch(t *testing.T) {
	for _, tc := range []struct {
		name  string
		event bool
		stop  bool // the events stop (channel closed) after the first
		poll  time.Duration
	}{
		{"poll", false, false, localAddrPoll},
		{"deletion event", true, false, time.Hour},
		{"events stop: poll every second", true, true, time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newConnTracker(nil)
			c, err := tr.DialContext(context.Background(), "tcp", loopbackServer(t))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			moved := make(chan struct{})
			var calls atomic.Int32
			addrs := func() ([]net.Addr, error) {
				calls.Add(1)
				select {
				case <-moved:
					return []net.Addr{&net.IPNet{IP: net.ParseIP("198.18.0.103"), Mask: net.CIDRMask(24, 32)}}, nil
				default:
					return []net.Addr{&net.IPNet{IP: net.ParseIP("127.0.0.1"), Mask: net.CIDRMask(8, 32)}}, nil
				}
			}
			var changed chan struct{}
			if tc.event {
				changed = make(chan struct{}, 1)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go tr.watch(ctx, addrs, changed, tc.poll, slog.New(slog.DiscardHandler))
			if tc.event {
				changed <- struct{}{} // an unrelated address went: nothing to close
			}
			if tc.stop {
				close(changed)
			}
			time.Sleep(localAddrPoll + 200*time.Millisecond)
			if n := calls.Load(); n > 5 {
				t.Fatalf("%d address listings in %v: the watch spins", n, localAddrPoll+200*time.Millisecond)
			}
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatalf("closed while its address was there: %v", err)
			}
			close(moved)
			if tc.event && !tc.stop {
				changed <- struct{}{}
			}
			start := time.Now()
			_ = c.SetReadDeadline(time.Now().Add(3 * localAddrPoll))
			_, err = c.Read(make([]byte, 1))
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("read after the address went: %v, want the connection closed", err)
			}
			t.Logf("closed %v after the address went", time.Since(start).Round(10*time.Millisecond))
		})
	}
}
