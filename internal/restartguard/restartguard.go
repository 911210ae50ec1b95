package restartguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/knftables"
)

// Chain is the guard's base chain in every guard table.
const Chain = "input"

// KeyKind says what identifies a guarded socket.
type KeyKind int

const (
	// AddrPort guards one address and port (the cluster DNS IP and 53):
	// sets "<name>-v4" (ipv4_addr . inet_service) and "<name>-v6".
	// Unspecified addresses are not guarded.
	AddrPort KeyKind = iota
	// Port guards a port on every local address (the ingress's :80 and
	// :443): one set "<name>" of inet_service.
	Port
)

// Protocol is a transport protocol the guard matches: "udp" or "tcp"
// (TCP: SYNs only).
type Protocol string

const (
	UDP Protocol = "udp"
	TCP Protocol = "tcp"
)

// Spec is one guard table; the comments are what an operator reads in
// `nft list table`.
type Spec struct {
	// Table is the table's name (family inet).
	Table, TableComment string
	Key                 KeyKind
	Protocols           []Protocol
	// Set holds the keys while they are served, for Timeout after the
	// last refresh.
	Set, SetComment string
	Timeout         time.Duration
	// DropComment is on the rule that drops what no socket takes.
	DropComment string
	// Draining, when not empty, is a set of keys whose server is stopping
	// gracefully (Drain), for DrainTimeout or until the next Install.
	Draining, DrainingComment string
	DrainTimeout              time.Duration
	// DrainDropComment is on the rule that drops draining keys.
	DrainDropComment string
}

// refreshEvery is how often Keep refreshes the keys' timeouts.
func (s *Spec) refreshEvery() time.Duration { return s.Timeout / 4 }

// validate names what a Spec lacks; the table would not load without it.
func (s *Spec) validate() error {
	var missing []string
	if s.Table == "" {
		missing = append(missing, "Table")
	}
	if s.Set == "" {
		missing = append(missing, "Set")
	}
	if len(s.Protocols) == 0 {
		missing = append(missing, "Protocols")
	}
	// nft counts set timeouts in whole seconds.
	if s.Timeout < time.Second {
		missing = append(missing, "a Timeout of 1s or more")
	}
	if s.Draining != "" && s.DrainTimeout < time.Second {
		missing = append(missing, "a DrainTimeout of 1s or more")
	}
	for _, p := range s.Protocols {
		if p != UDP && p != TCP {
			missing = append(missing, fmt.Sprintf("a known protocol (not %q)", p))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("restart guard spec %q needs %s", s.Table, strings.Join(missing, ", "))
	}
	return nil
}

// family is one group of rules and sets: "ip"/"ip6" for address keys, ""
// for port keys (which match both families).
type family struct{ name, suffix, addrType string }

var (
	familyV4   = family{"ip", "-v4", "ipv4_addr"}
	familyV6   = family{"ip6", "-v6", "ipv6_addr"}
	familyBoth = family{}
)

func (s *Spec) families() []family {
	if s.Key == Port {
		return []family{familyBoth}
	}
	return []family{familyV4, familyV6}
}

func (f family) setType() string {
	if f.addrType == "" {
		return "inet_service"
	}
	return f.addrType + " . inet_service"
}

// match is the start of a rule matching the packets of l4 whose key is in
// set.
func (f family) match(l4 Protocol, set string) string {
	m := string(l4) + " dport @" + set + " "
	if f.name != "" {
		m = f.name + " daddr . " + m
	}
	if l4 == TCP {
		m = "tcp flags & (fin | syn | rst | ack) == syn " + m
	}
	return m
}

// key is one guarded socket.
type key struct {
	addr netip.Addr // invalid for Port keys
	port uint16
}

func (k key) family() family {
	switch {
	case !k.addr.IsValid():
		return familyBoth
	case k.addr.Is4():
		return familyV4
	}
	return familyV6
}

func (k key) elem() []string {
	if !k.addr.IsValid() {
		return []string{strconv.Itoa(int(k.port))}
	}
	return []string{k.addr.String(), strconv.Itoa(int(k.port))}
}

func (k key) String() string {
	if !k.addr.IsValid() {
		return strconv.Itoa(int(k.port))
	}
	return netip.AddrPortFrom(k.addr, k.port).String()
}

// Guard programs one guard table for the sockets its owner bound. It is not
// safe for concurrent use: the owner calls Install, then Keep (in its own
// goroutine), then Drain once Keep has returned.
type Guard struct {
	spec Spec
	nft  knftables.Interface
	log  *slog.Logger
	keys []key
	// socket is false while the kernel refuses the socket expression
	// (the last Install or Refresh fell back to the draining half).
	socket bool
}

// New makes the guard for the sockets bound at these addresses; port 0 and
// (for AddrPort keys) unspecified addresses are left out. nft must be opened
// on spec.Table, family inet. Nothing is changed until Install.
func New(nft knftables.Interface, spec Spec, log *slog.Logger, bound []netip.AddrPort) *Guard {
	g := &Guard{spec: spec, nft: nft, log: log, socket: true}
	for _, ap := range bound {
		k := key{port: ap.Port()}
		if spec.Key == AddrPort {
			if !ap.Addr().IsValid() || ap.Addr().IsUnspecified() {
				continue
			}
			k.addr = ap.Addr().Unmap()
		}
		if k.port != 0 && !slices.Contains(g.keys, k) {
			g.keys = append(g.keys, k)
		}
	}
	return g
}

// Empty reports whether nothing is guarded (no key survived New's filter):
// Install, Keep and Drain then change nothing.
func (g *Guard) Empty() bool { return len(g.keys) == 0 }

// Install creates or refreshes the table for the guard's keys and clears
// the draining set: the owner serves now. It is idempotent.
func (g *Guard) Install(ctx context.Context) error { return g.serving(ctx, true) }

// Refresh restarts the keys' timeouts. Unlike Install it leaves the
// draining set alone, so a refresh racing a graceful stop cannot undo it.
func (g *Guard) Refresh(ctx context.Context) error { return g.serving(ctx, false) }

func (g *Guard) serving(ctx context.Context, clearDraining bool) error {
	if g.Empty() {
		return nil
	}
	if err := g.spec.validate(); err != nil {
		return err
	}
	// Every time the whole table first: a transient failure must not
	// leave the guard without its socket rules for good.
	err := g.nft.Run(ctx, g.transaction(clearDraining, true))
	if err == nil {
		if !g.socket {
			g.log.Info("restart guard uses the socket expression again", "table", g.spec.Table)
		}
		g.socket = true
		return nil
	}
	if g.spec.Draining == "" {
		return err
	}
	// A kernel without the socket expression: keep the graceful half
	// rather than nothing.
	if err2 := g.nft.Run(ctx, g.transaction(clearDraining, false)); err2 != nil {
		return err
	}
	if g.socket {
		g.log.Warn("restart guard without the socket expression: while a crashed agent restarts, new connections are refused",
			"table", g.spec.Table, "err", err)
	}
	g.socket = false
	return nil
}

// transaction installs (or refreshes) the whole table.
func (g *Guard) transaction(clearDraining, socket bool) *knftables.Transaction {
	s := &g.spec
	tx := g.nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo(s.TableComment)})
	tx.Add(&knftables.Chain{Name: Chain, Type: knftables.PtrTo(knftables.FilterType),
		Hook: knftables.PtrTo(knftables.InputHook), Priority: knftables.PtrTo(knftables.BaseChainPriority("-10"))})
	tx.Flush(&knftables.Chain{Name: Chain})
	timeout, drainTimeout := s.Timeout, s.DrainTimeout
	for _, f := range s.families() {
		set, draining := s.Set+f.suffix, s.Draining+f.suffix
		tx.Add(&knftables.Set{Name: set, Type: f.setType(), Flags: []knftables.SetFlag{knftables.TimeoutFlag},
			Timeout: &timeout, Comment: knftables.PtrTo(s.SetComment)})
		if s.Draining != "" {
			tx.Add(&knftables.Set{Name: draining, Type: f.setType(), Flags: []knftables.SetFlag{knftables.TimeoutFlag},
				Timeout: &drainTimeout, Comment: knftables.PtrTo(s.DrainingComment)})
			for _, l4 := range s.Protocols {
				tx.Add(&knftables.Rule{Chain: Chain, Rule: f.match(l4, draining) + "drop", Comment: knftables.PtrTo(s.DrainDropComment)})
			}
			if clearDraining {
				tx.Flush(&knftables.Set{Name: draining})
			}
		}
		if socket {
			for _, l4 := range s.Protocols {
				for _, transparent := range []string{"0", "1"} {
					tx.Add(&knftables.Rule{Chain: Chain, Rule: f.match(l4, set) + "socket transparent " + transparent + " accept"})
				}
				tx.Add(&knftables.Rule{Chain: Chain, Rule: f.match(l4, set) + "drop", Comment: knftables.PtrTo(s.DropComment)})
			}
		}
		// Flush and add again: adding an element that exists would not
		// restart its timeout.
		tx.Flush(&knftables.Set{Name: set})
	}
	for _, k := range g.keys {
		tx.Add(&knftables.Element{Set: s.Set + k.family().suffix, Key: k.elem()})
	}
	return tx
}

// Keep refreshes the guard every Spec.Timeout/4 until ctx ends. A
// failure goes to failed, never ends the loop: the owner serves either way,
// and the keys stay guarded until their timeout.
func (g *Guard) Keep(ctx context.Context, failed func(error)) {
	if g.Empty() || g.spec.validate() != nil {
		return // Install said why
	}
	t := time.NewTicker(g.spec.refreshEvery())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := g.Refresh(ctx); err != nil && ctx.Err() == nil {
				failed(err)
			}
		}
	}
}

// Drain makes the guard drop new exchanges to its keys, socket or not,
// until the next Install (or Spec.DrainTimeout): the owner is about to
// close its sockets, and what arrives from now on should wait for the
// next server rather than be reset by the closing one.
func (g *Guard) Drain(ctx context.Context) error {
	if g.spec.Draining == "" {
		return errors.New("restart guard " + g.spec.Table + " has no draining set")
	}
	if g.Empty() {
		return nil
	}
	tx := g.nft.NewTransaction()
	for _, k := range g.keys {
		tx.Add(&knftables.Element{Set: g.spec.Draining + k.family().suffix, Key: k.elem()})
	}
	return g.nft.Run(ctx, tx)
}

// Socket reports whether the guard uses the socket expression (false after
// Install fell back to the draining half on an old kernel).
func (g *Guard) Socket() bool { return g.socket }

func (g *Guard) String() string {
	keys := make([]string, len(g.keys))
	for i, k := range g.keys {
		keys[i] = k.String()
	}
	what := "addresses"
	if g.spec.Key == Port {
		what = "ports"
	}
	return fmt.Sprintf("table inet %s, %s %s", g.spec.Table, what, strings.Join(keys, ","))
}
