package dns

import (
	"time"

	"knit.dev/knit/internal/restartguard"
)

// The restart guard (package internal/restartguard says why it exists):
// cluster DNS lives in the agent process, on this node's own copy of the DNS
// Service IP, so while the agent restarts nothing is bound there and the
// kernel would refuse every query. Table inet knit-dns drops queries to the
// addresses DNS serves (address . port, UDP and TCP) while no socket takes
// them, so resolvers retry and reach the restarted server. Queries to a
// bound socket are never touched. Without the kernel's socket expression
// (before Linux 4.18) no guard is installed.
//
// DNS has no draining set: a UDP socket queues no connections, so the
// moment it closes its queries meet the drop rule. Only TCP queries whose
// handshake completed into the accept queue just then are reset (the
// ingress drains for those; for DNS over TCP it is not worth the stop's
// delay).
const guardTable = "knit-dns"

var guardSpec = restartguard.Spec{
	Table:        guardTable,
	TableComment: "knit dns: queries wait, rather than fail, while the agent restarts",
	Key:          restartguard.AddrPort,
	Protocols:    []restartguard.Protocol{restartguard.UDP, restartguard.TCP},
	Set:          "serving",
	SetComment:   "cluster DNS addresses, refreshed while DNS runs",
	Timeout:      10 * time.Minute,
	DropComment:  "no DNS socket: the agent is restarting",
}
