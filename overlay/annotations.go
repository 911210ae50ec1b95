package overlay

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
)

// Annotations each node publishes on its own Node object for its peers.
// "v6" in a key names the underlay family: AnnotationVTEPMACv6 is the MAC of
// the device whose outer packets are IPv6, whatever pod traffic it carries.
const (
	AnnotationPublicIP   = "overlay.knit.dev/public-ip"    // IPv4 underlay address
	AnnotationPublicIPv6 = "overlay.knit.dev/public-ip-v6" // IPv6 underlay address
	AnnotationVTEPMAC    = "overlay.knit.dev/vtep-mac"     // MAC of knit-vx4 (IPv4 underlay)
	AnnotationVTEPMACv6  = "overlay.knit.dev/vtep-mac-v6"  // MAC of knit-vx6 (IPv6 underlay)
)

var (
	publicIPKeys = [2]string{AnnotationPublicIP, AnnotationPublicIPv6}
	vtepMACKeys  = [2]string{AnnotationVTEPMAC, AnnotationVTEPMACv6}
	ownedKeys    = []string{AnnotationPublicIP, AnnotationPublicIPv6, AnnotationVTEPMAC, AnnotationVTEPMACv6}
)

// Reasons a peer (or one family of it) is skipped; the label values of
// knit_overlay_peers_skipped_total.
const (
	reasonNoPodCIDR          = "no-podcidr"
	reasonMalformedPodCIDR   = "malformed-podcidr"
	reasonMissingAnnotation  = "missing-annotation"
	reasonMalformed          = "malformed-annotation"
	reasonWrongFamily        = "wrong-family"
	reasonOverlapping        = "overlapping-podcidr"
	reasonOutsideClusterCIDR = "outside-cluster-cidr"
	reasonNotSameSubnet      = "not-same-subnet"
	reasonDuplicateMAC       = "duplicate-vtep-mac"
)

// skipError says why a peer, or one pod family of it, gets no entries.
type skipError struct {
	Reason string
	Detail string
}

func (e *skipError) Error() string { return e.Reason + ": " + e.Detail }

func skipf(reason, format string, args ...any) *skipError {
	return &skipError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// parsePeer reads what the overlay needs from a Node. It never fails on
// missing annotations (the render decides whether the path it wants needs
// them) but rejects the whole node on anything malformed: a node publishing
// garbage gets no routes rather than half-right ones.
func parsePeer(n *corev1.Node) (peer, *skipError) {
	p := peer{Name: n.Name}

	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	if len(cidrs) == 0 {
		return p, skipf(reasonNoPodCIDR, "node has no spec.podCIDRs")
	}
	for _, s := range cidrs {
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return p, skipf(reasonMalformedPodCIDR, "podCIDR %q: %v", s, err)
		}
		if pfx != pfx.Masked() {
			return p, skipf(reasonMalformedPodCIDR, "podCIDR %q has host bits set", s)
		}
		if pfx.Addr().Is4In6() {
			return p, skipf(reasonMalformedPodCIDR, "podCIDR %q is an IPv4-mapped IPv6 prefix", s)
		}
		f := familyOf(pfx.Addr())
		if p.PodCIDRs[f].IsValid() {
			return p, skipf(reasonWrongFamily, "two %s podCIDRs (%s, %s)", f, p.PodCIDRs[f], pfx)
		}
		p.PodCIDRs[f] = pfx
	}

	for _, f := range families {
		if s, ok := n.Annotations[publicIPKeys[f]]; ok {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return p, skipf(reasonMalformed, "%s=%q: %v", publicIPKeys[f], s, err)
			}
			if a.Zone() != "" || a.Is4In6() || !a.IsGlobalUnicast() {
				return p, skipf(reasonMalformed, "%s=%q is not a usable unicast address", publicIPKeys[f], s)
			}
			if familyOf(a) != f {
				return p, skipf(reasonWrongFamily, "%s=%q is not an %s address", publicIPKeys[f], s, f)
			}
			p.PublicIP[f] = a
		}
		if s, ok := n.Annotations[vtepMACKeys[f]]; ok {
			mac, err := net.ParseMAC(s)
			if err != nil {
				return p, skipf(reasonMalformed, "%s=%q: %v", vtepMACKeys[f], s, err)
			}
			if len(mac) != 6 || mac[0]&0x01 != 0 || isZeroMAC(mac) {
				return p, skipf(reasonMalformed, "%s=%q is not a unicast Ethernet address", vtepMACKeys[f], s)
			}
			p.MAC[f] = mac
		}
	}
	return p, nil
}

func isZeroMAC(mac net.HardwareAddr) bool {
	for _, b := range mac {
		if b != 0 {
			return false
		}
	}
	return true
}

// ownAnnotations are the annotations this node publishes, given its
// underlay and VXLAN devices. Keys the node has nothing for map to "" and
// are removed from the Node.
func ownAnnotations(loc localNode, devs []device) map[string]string {
	out := make(map[string]string, len(ownedKeys))
	for _, k := range ownedKeys {
		out[k] = ""
	}
	for _, f := range families {
		if a := loc.Underlay[f].Addr; a.IsValid() {
			out[publicIPKeys[f]] = a.String()
		}
	}
	for _, d := range devs {
		out[vtepMACKeys[d.Underlay]] = d.MAC.String()
	}
	return out
}

// annotationPatch is the JSON merge patch that turns the Node's current
// annotations into want (a "" value deletes the key), or nil when nothing
// differs. A merge patch touches only the listed keys, so annotations
// written by others, and a concurrent writer of other fields, are safe.
func annotationPatch(current, want map[string]string) ([]byte, error) {
	changes := map[string]any{}
	for k, v := range want {
		cur, has := current[k]
		switch {
		case v == "" && has:
			changes[k] = nil
		case v != "" && (!has || cur != v):
			changes[k] = v
		}
	}
	if len(changes) == 0 {
		return nil, nil
	}
	return json.Marshal(map[string]any{"metadata": map[string]any{"annotations": changes}})
}
