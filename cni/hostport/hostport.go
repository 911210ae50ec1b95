// Package hostport owns knit's hostPort table, `table inet knit-hostport`:
// the DNAT from a port of the node to a pod (the CNI portMappings
// capability, which is how kubelet/containerd pass a container's hostPort).
//
// The table is rendered whole from the IPAM store's reservations (every
// reservation carries its port mappings) and applied in one nft transaction
// by the CNI plugin while it holds the store's lock, so concurrent ADDs and
// DELs never interleave and a crash between two of them leaves nothing the
// next render does not fix. No mapping left: the table is deleted.
//
// Packet flow (IPv6 is the same with the -v6 maps and sets):
//
//	prerouting (nat, dstnat) / output (nat, -100, not to 127.0.0.0/8)
//	  fib daddr type local -> jump hostports
//	hostports:
//	  dnat ip to ip daddr . l4proto . th dport map @hostip-hostport-v4  (hostIP set)
//	  dnat ip to l4proto . th dport map @hostport-v4                    (any local IP)
//	postrouting (nat, srcnat):
//	  ip saddr . ip daddr @hairpin-v4 masquerade   (a pod reaching itself
//	                                                 through its hostPort)
//
// Maps are keyed by protocol and port (and host IP): a key has one value, so
// two pods cannot claim the same hostPort; the plugin refuses the second one
// before rendering. Like the reference portmap plugin, the hostPort is not
// reachable through 127.0.0.1 (that needs route_localnet) and traffic from
// another pod on the same bridge is not masqueraded (that needs
// br_netfilter, as with portmap).
package hostport

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"sigs.k8s.io/knftables"

	"knit.dev/knit/cni/ipam"
)

// TableName is the nftables table (family inet) this package owns.
const TableName = "knit-hostport"

// Names of the objects in the table.
const (
	chainHostports   = "hostports"
	chainPrerouting  = "prerouting"
	chainOutput      = "output"
	chainPostrouting = "postrouting"
)

type family struct {
	suffix, ip, addrType, nfproto, loopback string
}

var (
	v4 = family{suffix: "v4", ip: "ip", addrType: "ipv4_addr", nfproto: "ipv4", loopback: "127.0.0.0/8"}
	v6 = family{suffix: "v6", ip: "ip6", addrType: "ipv6_addr", nfproto: "ipv6", loopback: "::1"}
)

func (f family) anyMap() string    { return "hostport-" + f.suffix }
func (f family) hostIPMap() string { return "hostip-hostport-" + f.suffix }
func (f family) hairpinSet() string {
	return "hairpin-" + f.suffix
}

// Mapping is one hostPort of one pod address.
type Mapping struct {
	Owner    ipam.Attachment
	HostIP   netip.Addr // invalid: every local address of the node
	HostPort uint16
	Protocol string // tcp, udp, sctp
	PodIP    netip.Addr
	PodPort  uint16
}

// key is what a map element is keyed by; two mappings with the same key
// conflict.
type key struct {
	hostIP   netip.Addr
	port     uint16
	protocol string
	v6       bool
}

func (m Mapping) key() key {
	return key{hostIP: m.HostIP, port: m.HostPort, protocol: m.Protocol, v6: m.PodIP.Is6()}
}

// FromReservations expands the reservations' port mappings into one Mapping
// per pod address of the matching family (a mapping without hostIP on a
// dual-stack pod yields an IPv4 and an IPv6 mapping). Reservations are taken
// in order; a later mapping that conflicts with an earlier one is dropped
// and reported, so one bad reservation cannot break everyone's hostPorts.
func FromReservations(rs []ipam.Reservation) (ms []Mapping, conflicts []Mapping) {
	seen := make(map[key]bool)
	for _, r := range rs {
		for _, pm := range r.PortMappings {
			for _, ip := range r.IPs {
				if pm.HostIP.IsValid() && pm.HostIP.Is4() != ip.Is4() {
					continue
				}
				m := Mapping{Owner: r.Attachment, HostIP: pm.HostIP, HostPort: pm.HostPort,
					Protocol: pm.Protocol, PodIP: ip, PodPort: pm.ContainerPort}
				if seen[m.key()] {
					conflicts = append(conflicts, m)
					continue
				}
				seen[m.key()] = true
				ms = append(ms, m)
			}
		}
	}
	return ms, conflicts
}

// Conflicts returns the mappings of r that collide with those of others
// (same host IP, port, protocol and family).
func Conflicts(r ipam.Reservation, others []ipam.Reservation) []Mapping {
	var rest []ipam.Reservation
	for _, o := range others {
		if o.Attachment != r.Attachment {
			rest = append(rest, o)
		}
	}
	taken, _ := FromReservations(rest)
	keys := make(map[key]Mapping, len(taken))
	for _, m := range taken {
		keys[m.key()] = m
	}
	mine, _ := FromReservations([]ipam.Reservation{r})
	var out []Mapping
	for _, m := range mine {
		if o, ok := keys[m.key()]; ok {
			out = append(out, o)
		}
	}
	return out
}

// Render adds to tx the whole table for ms, replacing whatever the table
// held. With no mappings it deletes the table.
func Render(tx *knftables.Transaction, ms []Mapping) {
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("knit hostPort DNAT (owned by the knit CNI plugin)")})
	if len(ms) == 0 {
		tx.Delete(&knftables.Table{})
		return
	}
	for _, f := range []family{v4, v6} {
		for _, m := range []*knftables.Map{
			{Name: f.anyMap(), Type: "inet_proto . inet_service : " + f.addrType + " . inet_service"},
			{Name: f.hostIPMap(), Type: f.addrType + " . inet_proto . inet_service : " + f.addrType + " . inet_service"},
		} {
			tx.Add(m)
			tx.Flush(m)
		}
		s := &knftables.Set{Name: f.hairpinSet(), Type: f.addrType + " . " + f.addrType}
		tx.Add(s)
		tx.Flush(s)
	}
	chains := []*knftables.Chain{
		{Name: chainHostports},
		{Name: chainPrerouting, Type: knftables.PtrTo(knftables.NATType), Hook: knftables.PtrTo(knftables.PreroutingHook), Priority: knftables.PtrTo(knftables.DNATPriority)},
		// nft 1.0.6 does not accept the name "dstnat" at the output hook.
		{Name: chainOutput, Type: knftables.PtrTo(knftables.NATType), Hook: knftables.PtrTo(knftables.OutputHook), Priority: knftables.PtrTo(knftables.BaseChainPriority("-100"))},
		{Name: chainPostrouting, Type: knftables.PtrTo(knftables.NATType), Hook: knftables.PtrTo(knftables.PostroutingHook), Priority: knftables.PtrTo(knftables.SNATPriority)},
	}
	for _, c := range chains {
		tx.Add(c)
		tx.Flush(c)
	}
	tx.Add(&knftables.Rule{Chain: chainPrerouting, Rule: "fib daddr type local jump " + chainHostports})
	for _, f := range []family{v4, v6} {
		tx.Add(&knftables.Rule{Chain: chainOutput, Rule: knftables.Concat(
			f.ip, "daddr !=", f.loopback, "fib daddr type local jump", chainHostports)})
	}
	for _, f := range []family{v4, v6} {
		tx.Add(&knftables.Rule{Chain: chainHostports, Rule: knftables.Concat(
			"dnat", f.ip, "to", f.ip, "daddr . meta l4proto . th dport map", "@"+f.hostIPMap())})
		tx.Add(&knftables.Rule{Chain: chainHostports, Rule: knftables.Concat(
			"meta nfproto", f.nfproto, "dnat", f.ip, "to meta l4proto . th dport map", "@"+f.anyMap())})
		tx.Add(&knftables.Rule{Chain: chainPostrouting, Rule: knftables.Concat(
			f.ip, "saddr .", f.ip, "daddr", "@"+f.hairpinSet(), "masquerade")})
	}

	ms = slices.Clone(ms)
	slices.SortFunc(ms, compare)
	hairpin := make(map[netip.Addr]bool)
	for _, m := range ms {
		f := v4
		if m.PodIP.Is6() {
			f = v6
		}
		port := strconv.Itoa(int(m.HostPort))
		value := []string{m.PodIP.String(), strconv.Itoa(int(m.PodPort))}
		comment := m.Owner.String()
		if m.HostIP.IsValid() {
			tx.Add(&knftables.Element{Map: f.hostIPMap(), Key: []string{m.HostIP.String(), m.Protocol, port}, Value: value, Comment: &comment})
		} else {
			tx.Add(&knftables.Element{Map: f.anyMap(), Key: []string{m.Protocol, port}, Value: value, Comment: &comment})
		}
		if !hairpin[m.PodIP] {
			hairpin[m.PodIP] = true
			tx.Add(&knftables.Element{Set: f.hairpinSet(), Key: []string{m.PodIP.String(), m.PodIP.String()}})
		}
	}
}

func compare(a, b Mapping) int {
	if c := a.PodIP.Compare(b.PodIP); c != 0 {
		return c
	}
	if c := a.HostIP.Compare(b.HostIP); c != 0 {
		return c
	}
	if a.Protocol != b.Protocol {
		if a.Protocol < b.Protocol {
			return -1
		}
		return 1
	}
	return int(a.HostPort) - int(b.HostPort)
}

// Sync renders ms and applies it in one transaction.
func Sync(ctx context.Context, nft knftables.Interface, ms []Mapping) error {
	tx := nft.NewTransaction()
	Render(tx, ms)
	if err := nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("apply nftables table inet %s: %w", TableName, err)
	}
	return nil
}

// New returns the nftables interface for the table.
func New() (knftables.Interface, error) {
	return knftables.New(knftables.InetFamily, TableName)
}

// Check verifies that every mapping in ms is present in the table.
func Check(ctx context.Context, nft knftables.Interface, ms []Mapping) error {
	if len(ms) == 0 {
		return nil
	}
	have := make(map[string]map[string]string)
	for _, f := range []family{v4, v6} {
		for _, name := range []string{f.anyMap(), f.hostIPMap()} {
			elems, err := nft.ListElements(ctx, "map", name)
			if err != nil {
				return fmt.Errorf("list map %s of table inet %s: %w", name, TableName, err)
			}
			m := make(map[string]string, len(elems))
			for _, e := range elems {
				m[fmt.Sprint(e.Key)] = fmt.Sprint(e.Value)
			}
			have[name] = m
		}
	}
	for _, m := range ms {
		f := v4
		if m.PodIP.Is6() {
			f = v6
		}
		name, k := f.anyMap(), []string{m.Protocol, strconv.Itoa(int(m.HostPort))}
		if m.HostIP.IsValid() {
			name, k = f.hostIPMap(), append([]string{m.HostIP.String()}, k...)
		}
		want := fmt.Sprint([]string{m.PodIP.String(), strconv.Itoa(int(m.PodPort))})
		if got, ok := have[name][fmt.Sprint(k)]; !ok || got != want {
			return fmt.Errorf("hostPort %d/%s -> %s:%d missing from map %s of table inet %s", m.HostPort, m.Protocol, m.PodIP, m.PodPort, name, TableName)
		}
	}
	return nil
}
