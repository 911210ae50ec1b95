package node

import (
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"

	"knit.dev/knit/cni/ipam"
)

type metrics struct {
	released   prometheus.Counter
	syncErrors *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, s *Setup) (*metrics, error) {
	m := &metrics{
		released: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_cni_reconcile_released_total",
			Help: "IP reservations released because their pod is gone from this node.",
		}),
		syncErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_cni_sync_errors_total",
			Help: "Failed steps of the node setup, by stage (kernel, files, binary, reconcile).",
		}, []string{"stage"}),
	}
	for _, c := range []prometheus.Collector{m.released, m.syncErrors, &poolCollector{s: s}} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for _, stage := range []string{"kernel", "files", "binary", "reconcile"} {
		m.syncErrors.WithLabelValues(stage)
	}
	return m, nil
}

var (
	poolSizeDesc = prometheus.NewDesc("knit_cni_pool_size",
		"Addresses the plugin can hand out from this node's podCIDR, by IP family.", []string{"family"}, nil)
	allocatedDesc = prometheus.NewDesc("knit_cni_allocated_ips",
		"Addresses of this node's podCIDR reserved in the IPAM store, by IP family.", []string{"family"}, nil)
)

// poolCollector reads the IPAM store when scraped: the plugin allocates and
// releases without the agent, so a gauge set by the agent would lag.
// Reading is lock-free (the store is replaced by rename).
type poolCollector struct{ s *Setup }

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- poolSizeDesc
	ch <- allocatedDesc
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	pools := c.s.pools.Load()
	store := c.s.store.Load()
	if pools == nil || store == nil {
		return
	}
	st, err := store.View()
	if err != nil {
		return
	}
	for _, p := range *pools {
		fam := family(p)
		ch <- prometheus.MustNewConstMetric(poolSizeDesc, prometheus.GaugeValue, float64(ipam.PoolSize(p)), fam)
		ch <- prometheus.MustNewConstMetric(allocatedDesc, prometheus.GaugeValue, float64(st.Used(p)), fam)
	}
}

func family(p netip.Prefix) string {
	if p.Addr().Is4() {
		return "ipv4"
	}
	return "ipv6"
}
