package overlay

import (
	"crypto/sha256"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// family indexes the per-family arrays below. It is used both for the pod
// (inner) family and for the underlay (outer) family, which can differ: IPv6
// pod traffic may ride an IPv4 underlay.
type family int

const (
	v4 family = iota
	v6
)

var families = [2]family{v4, v6}

func familyOf(a netip.Addr) family {
	if a.Is4() {
		return v4
	}
	return v6
}

func (f family) String() string {
	if f == v4 {
		return "IPv4"
	}
	return "IPv6"
}

// af is the kernel's address family constant.
func (f family) af() int {
	if f == v4 {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func (f family) other() family { return 1 - f }

// hostBits is the prefix length of a single address of the family.
func (f family) hostBits() int {
	if f == v4 {
		return 32
	}
	return 128
}

// Device names: one VXLAN device per underlay family (the family of the
// outer packets), each carrying pod traffic of both families. Kernel link
// names are limited to 15 bytes.
const (
	deviceV4 = "knit-vx4" // VXLAN over the IPv4 underlay
	deviceV6 = "knit-vx6" // VXLAN over the IPv6 underlay
)

func deviceName(underlay family) string {
	if underlay == v4 {
		return deviceV4
	}
	return deviceV6
}

// VXLAN encapsulation overhead: outer Ethernet 14 + IP (20 or 40) + UDP 8 +
// VXLAN 8. The inner frame's own Ethernet header is not counted against the
// device MTU, so these are the amounts the pod MTU must shrink by.
func encapOverhead(underlay family) int {
	if underlay == v4 {
		return 50
	}
	return 70
}

// routeProtocol tags every route knit installs (the rtm_protocol field,
// shown by `ip route` as "proto 75"). It is how the reconciler finds its own
// routes, including direct routes that live on the shared underlay link,
// without ever touching anyone else's. Values up to 4 are the kernel's;
// /etc/iproute2/rt_protos assigns names to a few others, not to 75.
const routeProtocol = 75

// underlay is this node's side of one underlay family.
type underlay struct {
	Addr      netip.Addr   // the node IP; invalid when the node has none of this family
	Prefix    netip.Prefix // the on-link prefix holding Addr: peers in it are "same subnet"
	LinkIndex int          // the interface holding Addr
	MTU       int          // that interface's MTU
}

// localNode is everything the render needs to know about this node.
type localNode struct {
	Name     string
	PodCIDRs [2]netip.Prefix // by pod family; invalid when the node has none
	Underlay [2]underlay     // by underlay family
}

// peer is a remote node as published on its Node object.
type peer struct {
	Name     string
	PodCIDRs [2]netip.Prefix     // by pod family
	PublicIP [2]netip.Addr       // underlay address, by underlay family
	MAC      [2]net.HardwareAddr // VTEP MAC of the peer's device on that underlay family
}

// device is one VXLAN device as it should be.
type device struct {
	Name          string
	Underlay      family
	VNI           int
	Port          int
	Local         netip.Addr // the node IP the tunnel is sourced from
	UnderlayIndex int        // the interface holding Local (IFLA_VXLAN_LINK)
	MTU           int
	MAC           net.HardwareAddr
	// Addrs are this node's VTEP addresses: the first address of each local
	// podCIDR as a host route (/32, /128). They give host-to-remote-pod
	// traffic a source address inside the pod network, so replies come back
	// through the overlay; a host prefix creates no subnet or broadcast route.
	Addrs []netip.Prefix
}

// route is one route to a peer's podCIDR. VXLAN routes go via the peer's
// VTEP address "onlink" on a VXLAN device (Dev set); direct routes go via the
// peer's underlay address on the underlay link (LinkIndex set).
type route struct {
	Peer      string
	Dst       netip.Prefix
	Gw        netip.Addr
	Dev       string
	LinkIndex int
}

// neigh is a permanent neighbour entry: peer VTEP address -> peer VTEP MAC.
type neigh struct {
	Dev string
	IP  netip.Addr
	MAC net.HardwareAddr
}

// fdbEntry is a permanent forwarding entry: peer VTEP MAC -> peer underlay address.
type fdbEntry struct {
	Dev string
	MAC net.HardwareAddr
	Dst netip.Addr
}

// desired is the whole kernel state the overlay wants, rendered from the
// informer cache by render and applied by reconciler.apply.
type desired struct {
	Devices []device
	Routes  []route
	Neighs  []neigh
	FDB     []fdbEntry
}

// vtepMAC derives the MAC of one of this node's VXLAN devices from the node
// name and device name. A stable MAC means a device that is deleted and
// recreated (by an operator, or after the node IP changed) comes back with
// the MAC peers already have in their FDB and neighbour tables, so they keep
// working without waiting for the annotation round trip.
func vtepMAC(node, dev string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("knit-overlay/" + node + "/" + dev))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = (mac[0] | 0x02) &^ 0x01 // locally administered, unicast
	return mac
}

// vtepAddr is the VTEP address of a podCIDR: its first address (the
// flannel scheme: 10.42.2.0 for 10.42.2.0/24).
func vtepAddr(podCIDR netip.Prefix) netip.Addr { return podCIDR.Masked().Addr() }
