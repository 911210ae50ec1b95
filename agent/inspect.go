package agent

import (
	"net/http"

	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/doctor"
	"knit.dev/knit/proxy"
)

// inspector serves `knit doctor`'s node-side facts about one Service
// (package doctor). It reads the Services and EndpointSlices the proxy
// and DNS already cache; an agent running neither has no Service cache
// and says so rather than starting informers of its own.
func (a *Agent) inspector() http.Handler {
	in := &doctor.Inspector{
		Node:   a.cfg.NodeName,
		Domain: a.cfg.ClusterDomain,
		Bridge: plugin.DefaultBridge,
		Net:    doctor.Netlink{Bridge: plugin.DefaultBridge},
	}
	if a.cfg.Enabled["dns"] {
		in.DNS = a.cfg.ClusterDNS
	}
	if a.cfg.Enabled["proxy"] || a.cfg.Enabled["dns"] {
		svcs, slices := a.cache.Services().Informer(), a.cache.EndpointSlices().Informer()
		in.Services = a.cache.Services().Lister()
		in.Slices = a.cache.EndpointSlices().Lister()
		in.Synced = func() bool { return svcs.HasSynced() && slices.HasSynced() }
	}
	for _, c := range a.comps {
		if p, ok := c.(*proxy.Proxier); ok {
			in.ProxyBackend = func() string { return p.Status().Backend }
		}
	}
	if a.cfg.Enabled["proxy"] {
		if t, err := doctor.NewNFTables(); err == nil {
			in.Tables = t
		} else {
			a.log.Info("knit doctor will not see the proxy's rules on this node", "err", err)
		}
	}
	return in
}
