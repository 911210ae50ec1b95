package ingress

import (
	"net"
	"net/netip"
	"time"

	"knit.dev/knit/internal/restartguard"
)

// The restart guard (package internal/restartguard says why it exists): the
// ingress lives in the agent process, so while the agent restarts nothing
// listens on :80 and :443 and the kernel would reset every new connection.
// Table inet knit-ingress drops those SYNs instead (port keys, TCP), so the
// client's TCP retries its SYN and reaches the next ingress. Connections
// already accepted are not touched: they finish within ShutdownGrace.
//
// A graceful stop puts the ports in the draining set (drainGuard), keeps
// accepting for drainAccept (handshakes under way complete and are served),
// then closes the listeners: closing a listener resets what waits in its
// accept queue. The next ingress clears draining once it serves. Where the
// kernel has no socket expression (before Linux 4.18), only the graceful
// path is guarded.
const guardTable = "knit-ingress"

var guardSpec = restartguard.Spec{
	Table:            guardTable,
	TableComment:     "knit ingress: new connections wait, rather than fail, while the ingress restarts",
	Key:              restartguard.Port,
	Protocols:        []restartguard.Protocol{restartguard.TCP},
	Set:              "listening",
	SetComment:       "ingress ports, refreshed while the ingress runs",
	Timeout:          10 * time.Minute,
	DropComment:      "no listener: the ingress is restarting",
	Draining:         "draining",
	DrainingComment:  "ingress ports whose listener is closing",
	DrainTimeout:     time.Minute,
	DrainDropComment: "listener closing: the SYN retry finds the next one",
}

// drainAccept is how long a closing listener keeps accepting after the
// draining began: a handshake under way needs one round trip.
const drainAccept = 250 * time.Millisecond

// guardAddrs are the bound listeners' addresses, for restartguard.New.
func guardAddrs(addrs ...net.Addr) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range addrs {
		if ta, ok := a.(*net.TCPAddr); ok {
			out = append(out, ta.AddrPort())
		}
	}
	return out
}
