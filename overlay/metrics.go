package overlay

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	peersKnown      prometheus.Gauge
	peersProgrammed *prometheus.GaugeVec
	peersSkipped    *prometheus.CounterVec
	syncDuration    prometheus.Histogram
	errors          *prometheus.CounterVec
	kernelChanges   *prometheus.CounterVec
	forwardBlocked  *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		peersKnown: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_overlay_peers_known",
			Help: "Nodes other than this one in the informer cache.",
		}),
		peersProgrammed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "knit_overlay_peers_programmed",
			Help: "Peers with at least one podCIDR route, by how they are reached (vxlan, direct, mixed).",
		}, []string{"backend"}),
		peersSkipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_overlay_peers_skipped_total",
			Help: "Times a peer (or one IP family of it) started being skipped, by reason.",
		}, []string{"reason"}),
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "knit_overlay_sync_duration_seconds",
			Help:    "Duration of one render-diff-apply sync.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_overlay_errors_total",
			Help: "Failed steps, by stage (underlay, kernel, nftables, iptables, annotations).",
		}, []string{"stage"}),
		kernelChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_overlay_kernel_changes_total",
			Help: "Netlink changes made, by object (link, addr, fdb, neigh, route) and operation, and iptables changes (object iptables-forward: chain, jump, delete). Flat when nothing changes.",
		}, []string{"object", "op"}),
		forwardBlocked: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "knit_overlay_forward_blocked",
			Help: "Native nftables forward base chains with policy drop (value 1 each): they may drop pod traffic between nodes, and knit's FORWARD accept rules cannot override them.",
		}, []string{"family", "table", "chain"}),
	}
	for _, c := range []prometheus.Collector{m.peersKnown, m.peersProgrammed, m.peersSkipped,
		m.syncDuration, m.errors, m.kernelChanges, m.forwardBlocked} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for _, b := range []string{"vxlan", "direct", "mixed"} {
		m.peersProgrammed.WithLabelValues(b)
	}
	return m, nil
}
