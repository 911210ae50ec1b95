package dns

import (
	"knit.dev/knit/status"
)

// Status is the DNS component's section of the agent's status document.
func (s *Server) Status() *status.DNS {
	st := &status.DNS{Sync: s.syncRec.Get(), Domain: s.cfg.ClusterDomain, Names: s.idx.len()}
	for _, a := range s.Bound() {
		st.Listen = append(st.Listen, a.String())
	}
	for _, u := range s.fwd.upstreams {
		what := u.addr
		switch {
		case u.looping.Load():
			what += " (loops back: not used)"
		case u.down.Load():
			what += " (down)"
		}
		st.Upstreams = append(st.Upstreams, what)
	}
	return st
}
