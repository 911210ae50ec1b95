package ingress

import (
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests      *prometheus.CounterVec
	duration      prometheus.Histogram
	activeConns   prometheus.Gauge
	swaps         prometheus.Counter
	rebuild       prometheus.Histogram
	problems      *prometheus.GaugeVec
	routes        prometheus.Gauge
	upstreamDials prometheus.Counter
	retries       prometheus.Counter
	ejections     prometheus.Counter
	statusWrites  prometheus.Counter
	guardErrors   *prometheus.CounterVec

	noRoute *routeMetrics
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_ingress_requests_total",
			Help: "Requests answered, by rule host, status code and backend (\"namespace/service:port\").",
		}, []string{"host", "status", "backend"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "knit_ingress_request_duration_seconds",
			Help:    "Time from a request's head being read to its response being written.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		activeConns: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_ingress_active_connections",
			Help: "Client connections open now (HTTP, HTTPS and HTTP/2).",
		}),
		swaps: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_ingress_config_swaps_total",
			Help: "Routing tables built and swapped in.",
		}),
		rebuild: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "knit_ingress_config_build_duration_seconds",
			Help:    "Time to build a routing table from the cache.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		problems: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "knit_ingress_config_problems",
			Help: "Problems found in served Ingresses by the last build, by reason.",
		}, []string{"reason"}),
		routes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_ingress_routes",
			Help: "Host/path rules in the routing table.",
		}),
		upstreamDials: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_ingress_upstream_connections_opened_total",
			Help: "Connections opened to endpoints (reuse keeps this low).",
		}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_ingress_upstream_retries_total",
			Help: "Requests retried on another endpoint after a connection failure.",
		}),
		ejections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_ingress_upstream_ejections_total",
			Help: "Endpoints ejected by passive health checking.",
		}),
		statusWrites: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_ingress_status_updates_total",
			Help: "Ingress status.loadBalancer updates written.",
		}),
		guardErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_ingress_restart_guard_errors_total",
			Help: "Failures to program the restart guard (table inet knit-ingress), by step: install, refresh, drain.",
		}, []string{"step"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.activeConns, m.swaps, m.rebuild,
		m.problems, m.routes, m.upstreamDials, m.retries, m.ejections, m.statusWrites, m.guardErrors} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	m.noRoute = m.forRoute("", "")
	return m, nil
}

// routeMetrics caches the request counters of one (host, backend) pair by
// status code, so that counting a request is an atomic add rather than a
// label lookup.
type routeMetrics struct {
	vec           *prometheus.CounterVec
	host, backend string
	slots         [16]atomic.Pointer[codeCounter]
}

type codeCounter struct {
	code int
	c    prometheus.Counter
}

func (m *metrics) forRoute(host, backend string) *routeMetrics {
	return &routeMetrics{vec: m.requests, host: host, backend: backend}
}

func (rm *routeMetrics) inc(code int) {
	for i := 0; i < len(rm.slots); i++ {
		s := &rm.slots[(code+i)%len(rm.slots)]
		cc := s.Load()
		if cc == nil {
			cc = &codeCounter{code: code, c: rm.vec.WithLabelValues(rm.host, statusText(code), rm.backend)}
			if !s.CompareAndSwap(nil, cc) {
				cc = s.Load()
			}
		}
		if cc.code == code {
			cc.c.Inc()
			return
		}
	}
	rm.vec.WithLabelValues(rm.host, statusText(code), rm.backend).Inc()
}

var statusCodes = func() (t [600]string) {
	for i := range t {
		t[i] = strconv.Itoa(i)
	}
	return t
}()

func statusText(code int) string {
	if code >= 0 && code < len(statusCodes) {
		return statusCodes[code]
	}
	return strconv.Itoa(code)
}
