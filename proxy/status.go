package proxy

import (
	"sync/atomic"
	"time"

	"knit.dev/knit/status"
)

// statusState is what the sync goroutine leaves for Status.
type statusState struct {
	rec       status.SyncRecorder
	lastFull  atomic.Int64 // unix nanoseconds
	services  atomic.Int64
	endpoints atomic.Int64
	rules     atomic.Int64
}

// record is called by the sync goroutine after every sync.
func (s *statusState) record(st *state, res syncResult, full bool, err error) {
	s.rec.Record(err)
	if err != nil {
		return
	}
	if full {
		s.lastFull.Store(time.Now().UnixNano())
	}
	eps := 0
	for _, byPort := range st.endpoints {
		for _, pe := range byPort {
			eps += len(pe.eps)
		}
	}
	s.services.Store(int64(len(st.services)))
	s.endpoints.Store(int64(eps))
	s.rules.Store(int64(res.rules))
}

// Status is the proxy's section of the agent's status document.
func (p *Proxier) Status() *status.Proxy {
	st := &status.Proxy{
		Sync:      p.status.rec.Get(),
		Backend:   BackendNFTables,
		Table:     "inet " + tableName,
		Services:  int(p.status.services.Load()),
		Endpoints: int(p.status.endpoints.Load()),
		Rules:     int(p.status.rules.Load()),
	}
	if p.ipt != nil {
		st.Backend, st.Table = BackendIPTables, "KNIT-* chains"
		if p.ipt.detect != nil {
			st.Backend += "-" + p.ipt.detect.Variant
		}
	}
	if t := p.status.lastFull.Load(); t != 0 {
		st.LastFullSync = time.Unix(0, t)
	}
	return st
}

// TableName is the nftables table (family inet) the proxy owns.
const TableName = tableName

// ServiceChain is the name of the chain that the service-ips map sends a
// Service port's ClusterIP traffic to (policy Cluster), e.g.
// "service-v4-default/web/tcp/http"; an unnamed port is "_". Local (for
// internalTrafficPolicy Local) selects the "local-" chain instead. For
// `knit doctor`, which looks for a Service's rules in the kernel.
func ServiceChain(ipv6 bool, namespace, name, proto, port string, local bool) string {
	f := v4
	if ipv6 {
		f = v6
	}
	if port == "" {
		port = "_"
	}
	prefix := prefixCluster
	if local {
		prefix = prefixLocal
	}
	return chainName(prefix, f, namespace+"/"+name+"/"+proto+"/"+port)
}

// EndpointsMap is the map shared by the pick chains of one family and
// protocol: (ClusterIP . port . index) -> endpoint address . port.
func EndpointsMap(ipv6 bool, proto string) string { return endpointsMap(boolFamily(ipv6), proto) }

// ServiceIPsMap and NoEndpointServicesMap are the verdict maps keyed on
// "address . protocol . port" that hold, per family, the ClusterIPs with
// endpoints (goto the Service's chain) and those without (reject or drop).
func ServiceIPsMap(ipv6 bool) string { return perFamily(mapServiceIPs, boolFamily(ipv6)) }

// NoEndpointServicesMap: see ServiceIPsMap.
func NoEndpointServicesMap(ipv6 bool) string { return perFamily(mapNoEPServices, boolFamily(ipv6)) }

func boolFamily(ipv6 bool) family {
	if ipv6 {
		return v6
	}
	return v4
}
