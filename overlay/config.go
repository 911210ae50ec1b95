package overlay

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Backend selects how pod traffic crosses the underlay.
type Backend string

const (
	// BackendVXLAN encapsulates all cross-node pod traffic (works on any
	// underlay that passes UDP between the nodes).
	BackendVXLAN Backend = "vxlan"
	// BackendDirect routes each peer's podCIDR via the peer's node IP, with
	// no encapsulation. Every peer must be on this node's underlay subnet;
	// the others are skipped.
	BackendDirect Backend = "direct"
	// BackendAuto routes directly to peers on this node's underlay subnet
	// and through VXLAN to the rest.
	BackendAuto Backend = "auto"
)

// Defaults applied to zero fields.
const (
	DefaultVNI        = 1
	DefaultPort       = 8472 // the Linux kernel's and flannel's VXLAN port, not IANA's 4789
	DefaultSyncPeriod = 30 * time.Second
)

// Config holds the overlay's settings. Start from DefaultConfig: zero VNI,
// Port, SyncPeriod and Backend take their defaults, but a zero Masquerade
// means "off".
type Config struct {
	// NodeName is this node's Node object name. Required.
	NodeName string
	// NodeIP is the underlay address the tunnels are sourced from and that
	// peers send to. Zero: the Node's InternalIP addresses (one per family;
	// with both, each VXLAN device uses its own family's). Set it to force a
	// single underlay address; it must be assigned to an interface.
	NodeIP netip.Addr
	// Backend is vxlan (default), direct or auto.
	Backend Backend
	// VNI is the VXLAN network identifier (default 1). All nodes must agree.
	VNI int
	// Port is the VXLAN UDP destination port (default 8472). All nodes must agree.
	Port int
	// ClusterCIDRs are the pod networks. Pod traffic leaving them is
	// masqueraded; a peer podCIDR outside them is never routed. Required
	// when Masquerade is on.
	ClusterCIDRs []netip.Prefix
	// Masquerade pod traffic to destinations outside ClusterCIDRs behind the
	// node IP (default true in DefaultConfig).
	Masquerade bool
	// SyncPeriod is the interval of full resyncs against the kernel (default 30s).
	SyncPeriod time.Duration
	// ForwardRules accepts traffic from and to ClusterCIDRs in the
	// iptables filter FORWARD chain (chain KNIT-FORWARD, see forward.go),
	// so that a FORWARD policy of DROP (Docker's) does not cut pods off
	// (default true in DefaultConfig; flannel's --iptables-forward-rules).
	ForwardRules bool
	// ForwardMark is the proxy's masquerade mark bit: KNIT-FORWARD also
	// accepts packets carrying it, as kube-proxy's KUBE-FORWARD does. 0:
	// no such rule.
	ForwardMark uint32
}

// DefaultConfig returns the defaults; set NodeName and ClusterCIDRs.
func DefaultConfig() Config {
	return Config{
		Backend:      BackendVXLAN,
		VNI:          DefaultVNI,
		Port:         DefaultPort,
		Masquerade:   true,
		ForwardRules: true,
		SyncPeriod:   DefaultSyncPeriod,
	}
}

// normalize fills defaults and validates.
func (c Config) normalize() (Config, error) {
	if c.NodeName == "" {
		return c, errors.New("node name is required")
	}
	if c.Backend == "" {
		c.Backend = BackendVXLAN
	}
	switch c.Backend {
	case BackendVXLAN, BackendDirect, BackendAuto:
	default:
		return c, fmt.Errorf("backend %q: want vxlan, direct or auto", c.Backend)
	}
	if c.VNI == 0 {
		c.VNI = DefaultVNI
	}
	if c.VNI < 0 || c.VNI >= 1<<24 {
		return c, fmt.Errorf("VNI %d out of range 1-16777215", c.VNI)
	}
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.Port < 0 || c.Port > 65535 {
		return c, fmt.Errorf("port %d out of range", c.Port)
	}
	if c.SyncPeriod <= 0 {
		c.SyncPeriod = DefaultSyncPeriod
	}
	if c.NodeIP.IsValid() {
		c.NodeIP = c.NodeIP.Unmap()
		if c.NodeIP.Zone() != "" || !c.NodeIP.IsGlobalUnicast() {
			return c, fmt.Errorf("node IP %s is not a unicast address", c.NodeIP)
		}
	}
	c.ClusterCIDRs = slices.Clone(c.ClusterCIDRs)
	for i, p := range c.ClusterCIDRs {
		if !p.IsValid() || p.Bits() == 0 {
			return c, fmt.Errorf("cluster CIDR %v is not a usable prefix", p)
		}
		c.ClusterCIDRs[i] = p.Masked()
	}
	if c.Masquerade && len(c.ClusterCIDRs) == 0 {
		return c, errors.New("masquerade needs the cluster CIDRs")
	}
	if c.ForwardRules && len(c.ClusterCIDRs) == 0 {
		return c, errors.New("forward rules need the cluster CIDRs")
	}
	if c.ForwardMark&(c.ForwardMark-1) != 0 {
		return c, fmt.Errorf("forward mark %#x must be a single bit", c.ForwardMark)
	}
	return c, nil
}
