// Package ipam owns the node's pod IP reservations: which container
// attachment (container ID + interface name) holds which address of the
// node's podCIDR(s).
//
// Data flow:
//
//	CNI ADD/DEL/GC (package cni, one short-lived process per call)
//	agent reconciliation (package cni/node, plugin.ReleaseWhere)
//	        |  Store.Update(fn): flock(<network>.lock) -> read <network>.json
//	        v
//	     State (in memory) --fn--> Allocate / Release / Retain
//	        |  if changed: write <network>.json.tmp, rename over <network>.json
//	        v
//	     <StateDir>/<network>.json  (one JSON document, survives reboots)
//	     <StateDir>/<network>.boot  (boot ID of the boot that wrote it)
//
// Every change happens under an exclusive flock on a separate lock file, so
// concurrent plugin processes and the agent never hand out an address twice.
// The state file is replaced by rename, so a kill -9 at any moment leaves
// either the old or the new document. Readers that only look (STATUS,
// metrics) read the file without the lock and see one whole version.
//
// Reboots. A network namespace does not survive a reboot, so neither does
// any reservation: when the boot ID in <network>.boot differs from the
// running kernel's, the first writer of the new boot releases everything
// (this is what keeps a node whose runtime never ran DEL or GC after a power
// cut from exhausting its pool) and then records the new boot ID, durably.
// This is also why state writes are not fsynced by default: a power cut can
// only lose or tear a write about namespaces that the same power cut
// destroyed, and a state file torn by a crash of an earlier boot is
// recognised by the boot ID beside it and dropped. A torn file in the
// current boot cannot come from a crash and is reported, never replaced.
// Options.Durable restores fdatasync + directory fsync on every write for
// those who want it anyway (it costs 2-7 ms per ADD/DEL on a busy disk).
//
// Allocation is round-robin per pool: the next address after the last one
// handed out, wrapping at the end of the range, so a just-released address
// is not reused until the range wraps (conntrack entries and peers' ARP
// caches for the old pod have time to expire). The network address, the
// gateway (network+1, the node bridge) and, for IPv4, the broadcast address
// are never handed out.
package ipam

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// stateVersion is the on-disk format version of State.
const stateVersion = 1

// Attachment identifies one CNI attachment: the spec's (CNI_CONTAINERID,
// CNI_IFNAME) tuple.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

func (a Attachment) String() string { return a.ContainerID + "/" + a.IfName }

// PodRef is the Kubernetes pod an attachment belongs to, as the runtime
// passed it in CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID). The
// runtime's container ID is the sandbox ID, not the pod UID: this is what
// lets the agent match reservations against the pods it sees in the API.
type PodRef struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// IsZero reports whether no pod identity was recorded.
func (p PodRef) IsZero() bool { return p == PodRef{} }

// PortMapping is one hostPort of an attachment (CNI capability portMappings).
// It is kept with the reservation so that DEL and GC know what to unmap even
// when the runtime does not pass runtimeConfig again.
type PortMapping struct {
	HostPort      uint16     `json:"hostPort"`
	ContainerPort uint16     `json:"containerPort"`
	Protocol      string     `json:"protocol"` // "tcp", "udp" or "sctp"
	HostIP        netip.Addr `json:"hostIP,omitzero"`
}

// Reservation is one attachment's addresses, one per pool.
type Reservation struct {
	Attachment
	IPs          []netip.Addr  `json:"ips"`
	Created      time.Time     `json:"created"`
	Netns        string        `json:"netns,omitempty"`
	Pod          PodRef        `json:"pod,omitzero"`
	PortMappings []PortMapping `json:"portMappings,omitempty"`
}

// State is the whole store: reservations and the round-robin cursors.
type State struct {
	Version int `json:"version"`
	// Last is the last address handed out per pool (the round-robin cursor).
	Last         map[netip.Prefix]netip.Addr `json:"last,omitempty"`
	Reservations []Reservation               `json:"reservations"`

	dirty bool
}

// Request asks for addresses for one attachment.
type Request struct {
	Attachment
	Netns        string
	Pod          PodRef
	PortMappings []PortMapping
	Now          time.Time
}

// ExhaustedError reports a pool with no free address.
type ExhaustedError struct {
	Pool netip.Prefix
	Size uint64
}

func (e *ExhaustedError) Error() string {
	return fmt.Sprintf("pool %s exhausted: all %d addresses are reserved", e.Pool, e.Size)
}

// IsExhausted reports whether err is (or wraps) an ExhaustedError.
func IsExhausted(err error) bool {
	var e *ExhaustedError
	return errors.As(err, &e)
}

// ValidatePool checks that p can be allocated from: a masked prefix with room
// for at least one address besides network, gateway and broadcast.
func ValidatePool(p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("invalid prefix %v", p)
	}
	if p.Masked() != p {
		return fmt.Errorf("prefix %s has host bits set (want %s)", p, p.Masked())
	}
	if p.Addr().Is4In6() {
		return fmt.Errorf("prefix %s: IPv4-mapped IPv6 prefixes are not supported", p)
	}
	limit := 30
	if p.Addr().Is6() {
		limit = 126
	}
	if p.Bits() > limit {
		return fmt.Errorf("prefix %s too small: need at most /%d", p, limit)
	}
	return nil
}

// Gateway is the gateway address of pool p: the first address after the
// network address, held by the node bridge.
func Gateway(p netip.Prefix) netip.Addr { return p.Masked().Addr().Next() }

// firstHost and lastHost bound the addresses handed out from p.
func firstHost(p netip.Prefix) netip.Addr { return Gateway(p).Next() }

func lastHost(p netip.Prefix) netip.Addr {
	last := lastAddr(p)
	if last.Is4() {
		return last.Prev() // broadcast
	}
	return last
}

// lastAddr is the highest address of p (all host bits set).
func lastAddr(p netip.Prefix) netip.Addr {
	p = p.Masked()
	if p.Addr().Is4() {
		b := p.Addr().As4()
		for i := p.Bits(); i < 32; i++ {
			b[i/8] |= 0x80 >> (i % 8)
		}
		return netip.AddrFrom4(b)
	}
	b := p.Addr().As16()
	for i := p.Bits(); i < 128; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom16(b)
}

// PoolSize is the number of addresses p can hand out, saturated at
// math.MaxUint64 (an IPv6 /64 holds 2^64-2).
func PoolSize(p netip.Prefix) uint64 {
	hostBits := p.Addr().BitLen() - p.Bits()
	reserved := uint64(2) // network, gateway
	if p.Addr().Is4() {
		reserved = 3 // and broadcast
	}
	if hostBits >= 64 {
		if hostBits == 64 {
			return math.MaxUint64 - reserved + 1
		}
		return math.MaxUint64
	}
	n := uint64(1) << hostBits
	if n < reserved {
		return 0
	}
	return n - reserved
}

// Find returns the reservation of a, or nil.
func (s *State) Find(a Attachment) *Reservation {
	for i := range s.Reservations {
		if s.Reservations[i].Attachment == a {
			return &s.Reservations[i]
		}
	}
	return nil
}

// Owner returns the reservation holding ip, or nil.
func (s *State) Owner(ip netip.Addr) *Reservation {
	for i := range s.Reservations {
		if slices.Contains(s.Reservations[i].IPs, ip) {
			return &s.Reservations[i]
		}
	}
	return nil
}

// Used counts the reserved addresses inside pool p.
func (s *State) Used(p netip.Prefix) int {
	n := 0
	for _, r := range s.Reservations {
		for _, ip := range r.IPs {
			if p.Contains(ip) {
				n++
			}
		}
	}
	return n
}

// Allocate reserves one address from each pool for req's attachment. If the
// attachment already holds a reservation covering exactly these pools (a
// retried ADD), that reservation is returned, refreshed with req's metadata;
// a reservation from other pools (the node's podCIDR changed) is replaced.
func (s *State) Allocate(req Request, pools []netip.Prefix) (Reservation, error) {
	if req.ContainerID == "" || req.IfName == "" {
		return Reservation{}, errors.New("allocate: container ID and interface name are required")
	}
	if len(pools) == 0 {
		return Reservation{}, errors.New("allocate: no pools")
	}
	for _, p := range pools {
		if err := ValidatePool(p); err != nil {
			return Reservation{}, fmt.Errorf("allocate: %w", err)
		}
	}
	if r := s.Find(req.Attachment); r != nil {
		if coversPools(r.IPs, pools) {
			r.Netns, r.Pod, r.PortMappings = req.Netns, req.Pod, req.PortMappings
			s.dirty = true
			return cloneReservation(*r), nil
		}
		s.Release(req.Attachment)
	}

	used := make(map[netip.Addr]struct{}, len(s.Reservations)*len(pools))
	for _, r := range s.Reservations {
		for _, ip := range r.IPs {
			used[ip] = struct{}{}
		}
	}
	res := Reservation{
		Attachment:   req.Attachment,
		Created:      req.Now.UTC().Truncate(time.Millisecond),
		Netns:        req.Netns,
		Pod:          req.Pod,
		PortMappings: req.PortMappings,
	}
	if s.Last == nil {
		s.Last = make(map[netip.Prefix]netip.Addr)
	}
	for _, p := range pools {
		ip, ok := nextFree(p, s.Last[p], used)
		if !ok {
			return Reservation{}, &ExhaustedError{Pool: p, Size: PoolSize(p)}
		}
		res.IPs = append(res.IPs, ip)
	}
	// Commit only once every pool had an address, so that a failure leaves
	// the cursors untouched.
	for i, p := range pools {
		s.Last[p] = res.IPs[i]
	}
	for p := range s.Last {
		if !slices.Contains(pools, p) {
			delete(s.Last, p)
		}
	}
	s.Reservations = append(s.Reservations, res)
	s.dirty = true
	return cloneReservation(res), nil
}

// coversPools reports whether ips holds exactly one address in each pool.
func coversPools(ips []netip.Addr, pools []netip.Prefix) bool {
	if len(ips) != len(pools) {
		return false
	}
	for i, p := range pools {
		if !p.Contains(ips[i]) {
			return false
		}
	}
	return true
}

// nextFree walks p round-robin from the address after last and returns the
// first address not in used.
func nextFree(p netip.Prefix, last netip.Addr, used map[netip.Addr]struct{}) (netip.Addr, bool) {
	first, end := firstHost(p), lastHost(p)
	start := first
	if last.IsValid() && p.Contains(last) && last.Compare(first) >= 0 && last.Compare(end) < 0 {
		start = last.Next()
	}
	ip := start
	for {
		if _, taken := used[ip]; !taken {
			return ip, true
		}
		if ip == end {
			ip = first
		} else {
			ip = ip.Next()
		}
		if ip == start {
			return netip.Addr{}, false
		}
	}
}

// Release drops the reservation of a and returns it; ok is false when a held
// none (DEL is idempotent).
func (s *State) Release(a Attachment) (r Reservation, ok bool) {
	for i := range s.Reservations {
		if s.Reservations[i].Attachment == a {
			r = s.Reservations[i]
			s.Reservations = slices.Delete(s.Reservations, i, i+1)
			s.dirty = true
			return r, true
		}
	}
	return Reservation{}, false
}

// Retain keeps the reservations for which keep returns true and returns the
// ones it released.
func (s *State) Retain(keep func(Reservation) bool) []Reservation {
	var released []Reservation
	kept := s.Reservations[:0]
	for _, r := range s.Reservations {
		if keep(r) {
			kept = append(kept, r)
		} else {
			released = append(released, r)
		}
	}
	clear(s.Reservations[len(kept):])
	s.Reservations = kept
	if len(released) > 0 {
		s.dirty = true
	}
	return released
}

// Clone returns a deep copy of the reservations.
func (s *State) Clone() []Reservation {
	out := make([]Reservation, len(s.Reservations))
	for i, r := range s.Reservations {
		out[i] = cloneReservation(r)
	}
	return out
}

func cloneReservation(r Reservation) Reservation {
	r.IPs = slices.Clone(r.IPs)
	r.PortMappings = slices.Clone(r.PortMappings)
	return r
}

// validate checks a decoded state for what later code relies on.
func (s *State) validate() error {
	if s.Version != stateVersion {
		return fmt.Errorf("unsupported state version %d (want %d)", s.Version, stateVersion)
	}
	seen := make(map[Attachment]bool, len(s.Reservations))
	owner := make(map[netip.Addr]Attachment)
	for i, r := range s.Reservations {
		if r.ContainerID == "" || r.IfName == "" {
			return fmt.Errorf("reservations[%d]: empty containerID or ifname", i)
		}
		if seen[r.Attachment] {
			return fmt.Errorf("reservations[%d]: duplicate attachment %s", i, r.Attachment)
		}
		seen[r.Attachment] = true
		for _, ip := range r.IPs {
			if !ip.IsValid() {
				return fmt.Errorf("reservations[%d]: invalid IP", i)
			}
			if o, dup := owner[ip]; dup {
				return fmt.Errorf("reservations[%d]: %s also reserved by %s", i, ip, o)
			}
			owner[ip] = r.Attachment
		}
		for j, pm := range r.PortMappings {
			if pm.HostPort == 0 || pm.ContainerPort == 0 {
				return fmt.Errorf("reservations[%d].portMappings[%d]: zero port", i, j)
			}
			switch strings.ToLower(pm.Protocol) {
			case "tcp", "udp", "sctp":
			default:
				return fmt.Errorf("reservations[%d].portMappings[%d]: unknown protocol %q", i, j, pm.Protocol)
			}
		}
	}
	return nil
}
