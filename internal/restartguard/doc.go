// Package restartguard owns the nftables mechanism that makes clients wait,
// rather than fail, while a server in the agent process restarts: cluster
// DNS (table inet knit-dns) and the ingress (table inet knit-ingress) each
// describe their table with a Spec and drive one Guard.
//
// # Why
//
// DNS and the ingress live in the agent process. While the agent restarts
// (a DaemonSet rollout, a crash, an OOM kill) nothing is bound to their
// addresses for a second or more, and the kernel answers whatever arrives
// in that window at once: a UDP query with ICMP port unreachable, a TCP
// SYN with a reset. Clients treat that answer as final. glibc's stub
// resolver gives up on "connection refused" ("Temporary failure in name
// resolution") without trying its other attempts; an HTTP client gets
// ECONNREFUSED and its request fails.
//
// A packet that is dropped gets no answer at all, and for that case every
// client has a retry built in: a resolver asks again when its timeout
// expires (resolv.conf `options timeout`, 5 s by default; musl retransmits
// sooner, within that timeout), and TCP sends its SYN again after 1 s, then
// 2 s, 4 s. So the guard drops, where
// the kernel would refuse, exactly the packets that would open a new
// exchange with a server that is not there, and the retry reaches the
// restarted server. Packets that find a socket are never touched, nor are
// packets of connections already established (only SYNs are matched for
// TCP).
//
// # The table
//
// One table per user, which its Guard owns alone (every Install and Refresh
// flushes the chain and the key sets and writes them whole), with one
// input-hook chain:
//
//	table inet <Table>
//	  set <Set>[-v4|-v6]        guarded keys: port, or address . port (one
//	                            set per family); timeout Spec.Timeout,
//	                            refreshed every Timeout/4 while serving
//	  set <Draining>[-v4|-v6]   (optional) keys whose listener is closing;
//	                            timeout Spec.DrainTimeout
//	  chain input (filter, input hook, priority -10), per family and
//	  protocol; TCP: SYNs only
//	    key @<Draining>                   drop    graceful stop
//	    key @<Set>, a socket takes it     accept  ("socket transparent 0",
//	                                              "... 1": any socket)
//	    key @<Set>, no socket             drop    crash, or not up yet
//
// A serving owner calls Install (which also clears the draining set that a
// previous owner left), then Keep refreshes the keys' timeouts until it
// stops. A graceful stop of a TCP server calls Drain before closing its
// listeners: new connections are dropped from then on although the old
// listener still exists, and once the handshakes under way have completed
// (one round trip) closing it resets nothing that the next server could
// have served. Because every set times out, a server turned off for good
// stops being guarded within minutes even if nobody removes the table;
// `knit uninstall` deletes the tables (package uninstall lists their
// names).
//
// The "socket" expression needs Linux 4.18. On an older kernel the
// transaction fails: a Spec with a draining set then installs the draining
// half alone (graceful stops stay guarded, crashes are refused), a Spec
// without one installs nothing and Install returns the error. Every Install
// and Refresh tries the whole table first, so a transient failure does not
// cost the socket rules for good.
//
// Timers in the kernel, not the agent, end the guard, so a refresh that
// fails is harmless until the timeout: the owner counts and logs it and
// serves on.
package restartguard
