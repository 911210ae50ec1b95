package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// healthServers answers the healthCheckNodePort of every LoadBalancer
// Service with externalTrafficPolicy Local, as kube-proxy does: 200 with the
// number of local ready endpoints when there is at least one, 503 otherwise,
// so that an external load balancer only sends traffic to nodes that have
// endpoints (the client address is kept, so nodes without one must not get
// traffic). One HTTP server per port; the set follows each successful sync.
type healthServers struct {
	log     *slog.Logger
	bind    netip.Addr // invalid: all addresses
	listen  func(network, addr string) (net.Listener, error)
	healthy func() bool

	mu      sync.Mutex
	servers map[uint16]*hcServer
}

type hcServer struct {
	svc   types.NamespacedName
	count atomic.Int64
	srv   *http.Server
}

// hcWant is one health check port to serve.
type hcWant struct {
	svc   types.NamespacedName
	count int
}

func newHealthServers(log *slog.Logger, bind netip.Addr, healthy func() bool) *healthServers {
	return &healthServers{
		log:     log,
		bind:    bind,
		listen:  net.Listen,
		healthy: healthy,
		servers: map[uint16]*hcServer{},
	}
}

// update opens servers for new ports, closes those no longer wanted and sets
// the endpoint counts. A port that cannot be opened is logged and retried on
// the next update.
func (h *healthServers) update(want map[uint16]hcWant) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for port, s := range h.servers {
		if w, ok := want[port]; !ok || w.svc != s.svc {
			h.stop(port, s)
		}
	}
	for port, w := range want {
		s := h.servers[port]
		if s == nil {
			var err error
			if s, err = h.start(port, w.svc); err != nil {
				h.log.Warn("cannot serve healthCheckNodePort", "port", port, "service", w.svc.String(), "err", err)
				continue
			}
			h.servers[port] = s
		}
		s.count.Store(int64(w.count))
	}
}

func (h *healthServers) start(port uint16, svc types.NamespacedName) (*hcServer, error) {
	host := ""
	if h.bind.IsValid() {
		host = h.bind.String()
	}
	ln, err := h.listen("tcp", net.JoinHostPort(host, strconv.Itoa(int(port))))
	if err != nil {
		return nil, err
	}
	s := &hcServer{svc: svc}
	s.srv = &http.Server{Handler: s.handler(h.healthy), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			h.log.Warn("healthCheckNodePort server stopped", "port", port, "err", err)
		}
	}()
	return s, nil
}

func (h *healthServers) stop(port uint16, s *hcServer) {
	delete(h.servers, port)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

// closeAll stops every server (on shutdown).
func (h *healthServers) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for port, s := range h.servers {
		h.stop(port, s)
	}
}

func (s *hcServer) handler(healthy func() bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		count := s.count.Load()
		ok := healthy()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.FormatInt(count, 10))
		if count > 0 && ok {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintf(w, "{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %v\n}",
			s.svc.Namespace, s.svc.Name, count, ok)
	})
}

// healthChecks computes, from the state, the health check ports to serve and
// the number of distinct local ready endpoint addresses of each Service
// (terminating endpoints do not count: the node should be drained).
func healthChecks(st *state) map[uint16]hcWant {
	out := map[uint16]hcWant{}
	for name, info := range st.services {
		if info.healthCheckNodePort == 0 {
			continue
		}
		addrs := map[netip.Addr]bool{}
		for _, pe := range st.endpoints[name] {
			for _, e := range pe.eps {
				if e.local && e.ready {
					addrs[e.addr] = true
				}
			}
		}
		out[info.healthCheckNodePort] = hcWant{svc: name, count: len(addrs)}
	}
	return out
}
