package node

import (
	"knit.dev/knit/status"
)

// Status is the CNI node setup's section of the agent's status document:
// the node network config last written for the plugin, and how the last
// sync went.
func (s *Setup) Status() *status.CNI {
	st := &status.CNI{Sync: s.syncRec.Get(), Bridge: s.cfg.Bridge}
	if snap := s.snap.Load(); snap != nil {
		st.PodCIDRs, st.MTU = snap.PodCIDRs, snap.MTU
	}
	if w := s.waitingStatus.Load(); w != nil {
		st.Waiting = *w
	}
	return st
}

// recordApplied stores what Status reports; called by the sync loop.
func (s *Setup) recordApplied(d *desired) {
	snap := &status.CNI{MTU: d.node.MTU}
	for _, p := range d.node.PodCIDRs {
		snap.PodCIDRs = append(snap.PodCIDRs, p.String())
	}
	s.snap.Store(snap)
}
