package ingress

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/knftables"
)

// The restart guard: the ingress lives in the agent process, so while the
// agent restarts (a DaemonSet rollout, a crash) nothing listens on :80 and
// :443, and the kernel answers a new connection with a reset: the client's
// request fails. The guard, one nftables table of its own, drops those SYNs
// instead, so the client's TCP retries its SYN (after 1 s, then 2 s, 4 s)
// and reaches the next ingress. Connections already accepted are not
// touched: they finish within ShutdownGrace, as before.
//
//	table inet knit-ingress
//	  set listening { ports; timeout 10m, refreshed while the ingress runs }
//	  set draining  { ports whose listener is closing; timeout 1m }
//	  chain input (filter, input hook, priority -10), SYNs only:
//	    dport @draining                               drop   graceful stop
//	    dport @listening, a socket takes it           accept
//	    dport @listening, no socket                   drop   crash / not up yet
//
// A graceful stop puts the ports in draining, keeps accepting for
// drainAccept (handshakes under way complete and are served), then closes
// the listeners: closing a listener resets what waits in its accept queue.
// The next ingress clears draining once it serves. Both sets time out, so
// an ingress turned off for good stops holding the ports within minutes;
// `knit uninstall` deletes the table. Where the kernel has no nftables
// socket expression (before Linux 4.18), only the graceful path is guarded.
const (
	guardTable        = "knit-ingress"
	guardChain        = "input"
	guardListening    = "listening"
	guardDraining     = "draining"
	listeningTimeout  = 10 * time.Minute
	drainingTimeout   = time.Minute
	guardRefreshEvery = listeningTimeout / 4
	// drainAccept is how long a closing listener keeps accepting after
	// the draining began: a handshake under way needs one round trip.
	drainAccept = 250 * time.Millisecond
)

// synOnly matches the first packet of a TCP connection.
const synOnly = "tcp flags & (fin | syn | rst | ack) == syn "

// guard programs the restart guard table.
type guard struct {
	nft   knftables.Interface
	log   *slog.Logger
	ports []string // decimal TCP ports of the bound listeners
	// socket is false once the kernel refused the socket expression.
	socket bool
}

func newGuard(nft knftables.Interface, log *slog.Logger, addrs ...net.Addr) *guard {
	g := &guard{nft: nft, log: log, socket: true}
	for _, a := range addrs {
		if ta, ok := a.(*net.TCPAddr); ok && ta.Port > 0 {
			g.ports = append(g.ports, strconv.Itoa(ta.Port))
		}
	}
	return g
}

// serving installs (or refreshes) the guard for the bound ports; with
// clearDraining it also lets new connections through again after a
// previous ingress drained. It is idempotent.
func (g *guard) serving(ctx context.Context, clearDraining bool) error {
	if len(g.ports) == 0 {
		return nil
	}
	err := g.nft.Run(ctx, g.transaction(clearDraining))
	if err != nil && g.socket {
		// An old kernel without the socket expression: keep the graceful
		// half rather than nothing.
		g.socket = false
		if err2 := g.nft.Run(ctx, g.transaction(clearDraining)); err2 == nil {
			g.log.Warn("ingress restart guard without the socket expression: while a crashed agent restarts, new connections are refused",
				"err", err)
			return nil
		}
		g.socket = true
	}
	return err
}

func (g *guard) transaction(clearDraining bool) *knftables.Transaction {
	tx := g.nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("knit ingress: new connections wait, rather than fail, while the ingress restarts")})
	listening, draining := listeningTimeout, drainingTimeout
	tx.Add(&knftables.Set{Name: guardListening, Type: "inet_service", Flags: []knftables.SetFlag{knftables.TimeoutFlag},
		Timeout: &listening, Comment: knftables.PtrTo("ingress ports, refreshed while the ingress runs")})
	tx.Add(&knftables.Set{Name: guardDraining, Type: "inet_service", Flags: []knftables.SetFlag{knftables.TimeoutFlag},
		Timeout: &draining, Comment: knftables.PtrTo("ingress ports whose listener is closing")})
	tx.Add(&knftables.Chain{Name: guardChain, Type: knftables.PtrTo(knftables.FilterType),
		Hook: knftables.PtrTo(knftables.InputHook), Priority: knftables.PtrTo(knftables.BaseChainPriority("-10"))})
	tx.Flush(&knftables.Chain{Name: guardChain})
	tx.Add(&knftables.Rule{Chain: guardChain, Rule: synOnly + "tcp dport @" + guardDraining + " drop",
		Comment: knftables.PtrTo("listener closing: the SYN retry finds the next one")})
	if g.socket {
		for _, transparent := range []string{"0", "1"} {
			tx.Add(&knftables.Rule{Chain: guardChain, Rule: synOnly + "tcp dport @" + guardListening + " socket transparent " + transparent + " accept"})
		}
		tx.Add(&knftables.Rule{Chain: guardChain, Rule: synOnly + "tcp dport @" + guardListening + " drop",
			Comment: knftables.PtrTo("no listener: the ingress is restarting")})
	}
	// Flush and add again: adding an element that exists would not
	// restart its timeout.
	tx.Flush(&knftables.Set{Name: guardListening})
	for _, p := range g.ports {
		tx.Add(&knftables.Element{Set: guardListening, Key: []string{p}})
	}
	if clearDraining {
		tx.Flush(&knftables.Set{Name: guardDraining})
	}
	return tx
}

// draining makes the ports drop new connections until the next ingress
// serves (or drainingTimeout passes).
func (g *guard) draining(ctx context.Context) error {
	if len(g.ports) == 0 {
		return nil
	}
	tx := g.nft.NewTransaction()
	for _, p := range g.ports {
		tx.Add(&knftables.Element{Set: guardDraining, Key: []string{p}})
	}
	return g.nft.Run(ctx, tx)
}

func (g *guard) String() string {
	return fmt.Sprintf("table inet %s, ports %s", guardTable, strings.Join(g.ports, ","))
}
