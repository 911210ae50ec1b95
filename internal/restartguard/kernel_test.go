package restartguard_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/restartguard"
	"knit.dev/knit/lab/sandbox"
)

// probeWait is how long a probe waits for an answer: far less than a
// client's retry interval (a TCP SYN is sent again after 1 s), so a
// dropped packet reads as a timeout.
const probeWait = 300 * time.Millisecond

// probe sends one UDP datagram, or opens one TCP connection, and says
// what came back: "answered", "refused" (ICMP port unreachable / RST) or
// "timeout" (dropped).
func probe(network, addr string) string {
	c, err := net.DialTimeout(network, addr, probeWait)
	if err == nil && network == "udp" {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(probeWait))
		if _, err = c.Write([]byte("q")); err == nil {
			_, err = c.Read(make([]byte, 16))
		}
	} else if err == nil {
		c.Close()
	}
	var ne net.Error
	switch {
	case err == nil:
		return "answered"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return err.Error()
}

// echo serves UDP and TCP echo on addrs until closed.
type echo struct{ closers []io.Closer }

func (e *echo) listen(network, addr string) error {
	if network == "udp" {
		pc, err := net.ListenPacket(network, addr)
		if err != nil {
			return err
		}
		e.closers = append(e.closers, pc)
		go func() {
			buf := make([]byte, 512)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}()
		return nil
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	e.closers = append(e.closers, ln)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return nil
}

func (e *echo) close() {
	for _, c := range e.closers {
		c.Close()
	}
	e.closers = nil
}

// TestKernel runs both shapes of guard in a real kernel (a throwaway
// network namespace in the sandbox) through an owner's life and checks
// what a client sees: refused without the guard, dropped while guarded and
// unbound, answered while bound, dropped while draining (established
// connections untouched), answered again after the next Install.
func TestKernel(t *testing.T) {
	sandbox.Require(t)
	type probeCase struct{ network, addr, want string }
	type step struct {
		name   string
		do     func(g *restartguard.Guard, e *echo) error
		probes []probeCase
	}
	install := func(g *restartguard.Guard, _ *echo) error { return g.Install(context.Background()) }
	drain := func(g *restartguard.Guard, _ *echo) error { return g.Drain(context.Background()) }
	crash := func(_ *restartguard.Guard, e *echo) error { e.close(); return nil }
	all := func(want string, probes ...string) []probeCase { // "udp 127.0.0.1:53" ...
		var out []probeCase
		for _, p := range probes {
			network, addr, _ := strings.Cut(p, " ")
			out = append(out, probeCase{network, addr, want})
		}
		return out
	}
	guardedDNS := []string{"udp 127.0.0.1:5353", "tcp 127.0.0.1:5353", "udp [::1]:5353", "tcp [::1]:5353"}
	// Same port, another local address; same address, another port.
	unguardedDNS := []string{"udp 127.0.0.2:5353", "tcp 127.0.0.2:5353", "udp 127.0.0.1:5354", "tcp [::1]:5354"}
	guardedHTTP := []string{"tcp 127.0.0.1:8080", "tcp [::1]:8080", "tcp 127.0.0.2:8080"}
	for _, tc := range []struct {
		name  string
		spec  restartguard.Spec
		bound []netip.AddrPort
		serve func(e *echo) error
		steps []step
	}{{
		name:  "address . port, UDP and TCP",
		spec:  addrPortSpec,
		bound: addrPorts("127.0.0.1:5353", "[::1]:5353"),
		serve: func(e *echo) error {
			for _, p := range append(guardedDNS, "udp 127.0.0.1:5354", "tcp [::1]:5354") {
				network, addr, _ := strings.Cut(p, " ")
				if err := e.listen(network, addr); err != nil {
					return err
				}
			}
			return nil
		},
		steps: []step{
			{"no guard: refused", nil, all("refused", guardedDNS...)},
			{"guarded, nothing bound: dropped", install, append(all("timeout", guardedDNS...), all("refused", unguardedDNS...)...)},
			{"bound: answered", nil, all("answered", guardedDNS...)},
			{"crash: dropped", crash, append(all("timeout", guardedDNS...), all("refused", unguardedDNS...)...)},
			{"restarted: answered", nil, all("answered", guardedDNS...)},
		},
	}, {
		name:  "port, TCP, draining",
		spec:  portSpec,
		bound: addrPorts("[::]:8080"),
		serve: func(e *echo) error { return e.listen("tcp", "[::]:8080") },
		steps: []step{
			{"no guard: refused", nil, all("refused", guardedHTTP...)},
			{"guarded, nothing bound: dropped", install, append(all("timeout", guardedHTTP...), all("refused", "tcp 127.0.0.1:8081", "udp 127.0.0.1:8080")...)},
			{"bound: answered", nil, all("answered", guardedHTTP...)},
			{"draining, still bound: dropped", drain, all("timeout", guardedHTTP...)},
			{"next owner installs: answered", install, all("answered", guardedHTTP...)},
			{"crash: dropped", crash, all("timeout", guardedHTTP...)},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			inNS := newNetNS(t, tc.spec.Table)
			var g *restartguard.Guard
			if err := inNS(func() error {
				nft, err := knftables.New(knftables.InetFamily, tc.spec.Table)
				if err != nil {
					return err
				}
				g = restartguard.New(nft, tc.spec, discard(), tc.bound)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			e := &echo{}
			defer e.close()
			var established net.Conn
			for _, s := range tc.steps {
				got := make([]string, len(s.probes))
				err := inNS(func() error {
					if s.do != nil {
						if err := s.do(g, e); err != nil {
							return err
						}
					}
					if strings.Contains(s.name, "answered") && len(e.closers) == 0 {
						if err := tc.serve(e); err != nil {
							return err
						}
					}
					if established == nil && strings.HasPrefix(s.name, "bound") {
						c, err := net.Dial(s.probes[0].network, s.probes[0].addr)
						if err != nil {
							return err
						}
						established = c
					}
					for i, p := range s.probes {
						got[i] = probe(p.network, p.addr)
					}
					return nil
				})
				if err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				for i, p := range s.probes {
					if got[i] != p.want {
						t.Errorf("%s: %s %s %s, want %s", s.name, p.network, p.addr, got[i], p.want)
					}
				}
				// What was established goes on through drops and drains,
				// until its socket closes.
				if established != nil && len(e.closers) > 0 {
					if err := echoes(established); err != nil {
						t.Errorf("%s: established connection: %v", s.name, err)
					}
				}
			}
			if established != nil {
				established.Close()
			}
			if !g.Socket() {
				t.Error("the kernel refused the socket expression")
			}
		})
	}
}

func echoes(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != "ping" {
		return errors.New("echoed " + string(buf))
	}
	return nil
}

// newNetNS makes a throwaway network namespace with lo up and returns a
// function that runs fn with the calling thread in it (sockets made and
// programs exec'd there, like nft, are the namespace's).
func newNetNS(t *testing.T, name string) func(fn func() error) error {
	t.Helper()
	for _, args := range [][]string{{"ip", "netns", "add", name}, {"ip", "-n", name, "link", "set", "lo", "up"}} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	h, err := ns.GetNS("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return func(fn func() error) error { return h.Do(func(ns.NetNS) error { return fn() }) }
}
