package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	syncDuration       *prometheus.HistogramVec
	syncErrors         *prometheus.CounterVec
	programmingLatency prometheus.Histogram
	rules              prometheus.Gauge
	elements           *prometheus.GaugeVec
	invalid            *prometheus.CounterVec
	conntrackDeleted   prometheus.Counter
	conntrackErrors    prometheus.Counter
	noLocalEndpoints   prometheus.Gauge
	lastSync           prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		syncDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "knit_proxy_sync_duration_seconds",
			Help:    "Time to render and apply the rules, by kind of sync (full or partial).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"kind"}),
		syncErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_proxy_sync_errors_total",
			Help: "Syncs that failed to apply, by kind of sync; each is followed by a full resync.",
		}, []string{"kind"}),
		programmingLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "knit_proxy_network_programming_latency_seconds",
			Help:    "Time from the change that updated an EndpointSlice (its last-change-trigger-time annotation) to its rules being applied.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 18),
		}),
		rules: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_proxy_rules",
			Help: "Rules the proxy programs: in the knit-proxy nftables table, or in its KNIT- iptables chains (both families).",
		}),
		elements: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "knit_proxy_map_elements",
			Help: "Elements in the knit-proxy table's maps and sets, by map or set.",
		}, []string{"map"}),
		invalid: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_proxy_invalid_objects_total",
			Help: "Services and EndpointSlices (or parts of them) skipped because rules cannot express them.",
		}, []string{"kind"}),
		conntrackDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_proxy_conntrack_deleted_total",
			Help: "Stale UDP conntrack entries deleted after endpoint changes.",
		}),
		conntrackErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_proxy_conntrack_errors_total",
			Help: "Failed stale UDP conntrack cleanups.",
		}),
		noLocalEndpoints: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_proxy_no_local_endpoints",
			Help: "Service ports with externalTrafficPolicy Local and no local endpoint (external traffic dropped here).",
		}),
		lastSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_proxy_last_sync_timestamp_seconds",
			Help: "Unix time of the last successful sync.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.syncDuration, m.syncErrors, m.programmingLatency, m.rules,
			m.elements, m.invalid, m.conntrackDeleted, m.conntrackErrors, m.noLocalEndpoints, m.lastSync} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}
