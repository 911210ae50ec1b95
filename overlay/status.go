package overlay

import (
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"knit.dev/knit/status"
)

// Status is the overlay's section of the agent's status document: what the
// last sync rendered, and how the last sync went. It reads only what the
// sync loop stored; no kernel or API calls.
func (o *Overlay) Status() *status.Overlay {
	st := &status.Overlay{Backend: string(o.cfg.Backend), Sync: o.syncRec.Get()}
	if o.cfg.Backend != BackendDirect {
		st.VNI, st.Port = o.cfg.VNI, o.cfg.Port
	}
	if snap := o.snap.Load(); snap != nil {
		s := *snap
		s.Sync, s.Backend, s.VNI, s.Port = st.Sync, st.Backend, st.VNI, st.Port
		st = &s
	}
	st.Waiting = *o.waiting.Load()
	if b := o.blocked.Load(); b != nil {
		st.ForwardBlocked = *b
	}
	return st
}

// snapshot builds the rendered part of Status; called by the sync loop.
func snapshot(loc localNode, rd *rendered, nodes []*corev1.Node) *status.Overlay {
	st := &status.Overlay{PeersKnown: rd.Peers, PodMTU: rd.PodMTU}
	for _, p := range loc.PodCIDRs {
		if p.IsValid() {
			st.PodCIDRs = append(st.PodCIDRs, p.String())
		}
	}
	for _, f := range families {
		if u := loc.Underlay[f]; u.Addr.IsValid() && st.UnderlayMTU == 0 {
			st.UnderlayMTU = u.MTU
		}
	}
	if st.UnderlayMTU > 0 && rd.PodMTU > 0 {
		st.Overhead = st.UnderlayMTU - rd.PodMTU
	}
	for _, d := range rd.Devices {
		st.Devices = append(st.Devices, status.Device{Name: d.Name, MTU: d.MTU, Local: d.Local.String(), MAC: d.MAC.String()})
	}
	skipped := map[string][]string{}
	for _, s := range rd.Skips {
		what := s.Err.Reason
		if !s.Whole {
			what = s.Family.String() + ": " + what
		}
		skipped[s.Peer] = append(skipped[s.Peer], what)
	}
	for _, n := range nodes {
		if n.Name == loc.Name {
			continue
		}
		p := status.Peer{Node: n.Name, Via: rd.Programmed[n.Name], PodCIDRs: n.Spec.PodCIDRs}
		if len(p.PodCIDRs) == 0 && n.Spec.PodCIDR != "" {
			p.PodCIDRs = []string{n.Spec.PodCIDR}
		}
		if r := skipped[n.Name]; len(r) > 0 {
			sort.Strings(r)
			p.Skipped = strings.Join(r, ", ")
		}
		st.Peers = append(st.Peers, p)
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Node < st.Peers[j].Node })
	return st
}
