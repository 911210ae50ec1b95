package dns

import (
	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the component's Prometheus series, all knit_dns_*. The query
// counters are resolved once, so that counting a query is an array index
// and an atomic add.
type metrics struct {
	queries  [len(typeLabels)][len(rcodeLabels)]prometheus.Counter
	duration [numSources]prometheus.Observer
	dropped  prometheus.Counter

	cacheHits   prometheus.Counter
	cacheMisses prometheus.Counter

	upstreamLatency *prometheus.HistogramVec
	upstreamErrors  *prometheus.CounterVec
	upstreamHealthy *prometheus.GaugeVec
	forwardRejected prometheus.Counter
	loops           prometheus.Counter

	syncs        prometheus.Counter
	syncDuration prometheus.Observer

	guardErrors *prometheus.CounterVec
}

// Query types counted by name; the rest are "other".
var typeLabels = [...]string{"A", "AAAA", "SRV", "PTR", "TXT", "CNAME", "MX", "NS", "SOA", "HTTPS", "ANY", "other"}

func typeIndex(t uint16) int {
	switch t {
	case mdns.TypeA:
		return 0
	case mdns.TypeAAAA:
		return 1
	case mdns.TypeSRV:
		return 2
	case mdns.TypePTR:
		return 3
	case mdns.TypeTXT:
		return 4
	case mdns.TypeCNAME:
		return 5
	case mdns.TypeMX:
		return 6
	case mdns.TypeNS:
		return 7
	case mdns.TypeSOA:
		return 8
	case mdns.TypeHTTPS:
		return 9
	case mdns.TypeANY:
		return 10
	}
	return 11
}

var rcodeLabels = [...]string{"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other"}

func rcodeIndex(rc int) int {
	switch rc {
	case mdns.RcodeSuccess, mdns.RcodeFormatError, mdns.RcodeServerFailure, mdns.RcodeNameError, mdns.RcodeNotImplemented, mdns.RcodeRefused:
		return rc
	case mdns.RcodeBadVers:
		return 6
	}
	return 7
}

// source says where an answer came from, for the latency histogram.
type source int

const (
	srcCluster source = iota // the cluster index
	srcCache                 // the forwarding cache
	srcForward               // an upstream
	srcOther                 // errors, ANY, probes
	numSources
)

var sourceLabels = [numSources]string{"cluster", "cache", "forward", "other"}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{}
	queries := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knit_dns_queries_total",
		Help: "DNS queries answered, by query type and response code.",
	}, []string{"type", "rcode"})
	duration := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "knit_dns_request_duration_seconds",
		Help:    "Time from reading a query to having its answer, by where the answer came from.",
		Buckets: []float64{0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5},
	}, []string{"source"})
	dropped := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "knit_dns_dropped_total",
		Help: "Packets dropped without an answer (shorter than a header, or responses).",
	})
	hits := prometheus.NewCounter(prometheus.CounterOpts{Name: "knit_dns_cache_hits_total", Help: "Forwarded questions answered from the cache."})
	misses := prometheus.NewCounter(prometheus.CounterOpts{Name: "knit_dns_cache_misses_total", Help: "Forwarded questions not in the cache."})
	m.upstreamLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "knit_dns_upstream_duration_seconds",
		Help:    "Time an upstream took to answer (or fail), by upstream.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	}, []string{"upstream"})
	m.upstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knit_dns_upstream_errors_total",
		Help: "Failed exchanges with an upstream (timeouts, network errors, mismatched answers).",
	}, []string{"upstream"})
	m.upstreamHealthy = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "knit_dns_upstream_healthy",
		Help: "1 when the upstream is used, 0 while it is marked down or looping.",
	}, []string{"upstream"})
	m.forwardRejected = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "knit_dns_forward_rejected_total",
		Help: "Queries answered SERVFAIL because MaxConcurrentForwards were already in flight.",
	})
	m.loops = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "knit_dns_upstream_loops_total",
		Help: "Upstreams refused because forwarding to them loops back to this server.",
	})
	syncs := prometheus.NewCounter(prometheus.CounterOpts{Name: "knit_dns_syncs_total", Help: "Index syncs run."})
	syncDur := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "knit_dns_sync_duration_seconds",
		Help:    "Time to rebuild and publish the records of changed objects.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
	})
	m.guardErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knit_dns_restart_guard_errors_total",
		Help: "Failures to install or refresh the restart guard table knit-dns (DNS serves either way), by step.",
	}, []string{"step"})
	for _, c := range []prometheus.Collector{queries, duration, dropped, hits, misses, m.upstreamLatency, m.upstreamErrors,
		m.upstreamHealthy, m.forwardRejected, m.loops, syncs, syncDur, m.guardErrors} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for i, t := range typeLabels {
		for j, r := range rcodeLabels {
			m.queries[i][j] = queries.WithLabelValues(t, r)
		}
	}
	for i, s := range sourceLabels {
		m.duration[i] = duration.WithLabelValues(s)
	}
	m.dropped, m.cacheHits, m.cacheMisses = dropped, hits, misses
	m.syncs, m.syncDuration = syncs, syncDur
	return m, nil
}

// registerGauges adds the gauges read from the server's state at scrape time.
func (m *metrics) registerGauges(reg prometheus.Registerer, names, cached func() float64) error {
	for _, c := range []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "knit_dns_names", Help: "Names in the cluster index."}, names),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "knit_dns_cache_entries", Help: "Answers in the forwarding cache."}, cached),
	} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
