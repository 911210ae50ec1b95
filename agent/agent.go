// Package agent is the DaemonSet process: it connects to the API server,
// builds the ONE shared informer cache (package cluster), hands each enabled
// component only the informers it reads, runs the components under a
// supervisor, and serves /healthz, /readyz and /metrics on a node-local port.
//
//	             +------------------ agent ------------------+
//	API server ->| cluster.Cache (slim objects, one factory) |
//	             |   |         |        |        |       |   |
//	             |  cni     overlay   proxy     dns   ingress|-> kernel / servers
//	             |   (each: change tracker -> one sync loop) |
//	             +-------------------------------------------+
//
// Stopping the agent (SIGTERM) cancels every component and waits for them;
// no component removes kernel state on the way out, so established
// connections and Services keep working while the agent restarts.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"knit.dev/knit/cluster"
	"knit.dev/knit/overlay"
)

// Config is what the agent is told on its command line.
type Config struct {
	NodeName   string
	Kubeconfig string // empty: in-cluster service account
	// NodeIPs are this node's addresses; empty means the Node object's
	// InternalIPs, looked up at start.
	NodeIPs []netip.Addr

	ClusterCIDRs  []netip.Prefix
	ServiceCIDRs  []netip.Prefix
	ClusterDNS    []netip.Addr
	ClusterDomain string

	// HealthAddr serves /healthz, /readyz and /metrics.
	HealthAddr string
	// Profiling also serves Go's profiles (net/http/pprof) under
	// /debug/pprof/ on HealthAddr. Off by default: the CPU profile and
	// trace endpoints cost CPU for as long as a client asks.
	Profiling bool
	// GCPercent, when > 0, is the collector's GOGC; 0 means the GOGC
	// environment variable if set, else defaultGCPercent (see memory.go).
	GCPercent int
	// MemoryLimit, when > 0, is the Go runtime's soft memory limit in
	// bytes (runtime/debug.SetMemoryLimit; see memory.go). 0 leaves the
	// runtime's own (GOMEMLIMIT, else none).
	MemoryLimit int64
	// ReleaseStartupPages unmaps the binary's read-only pages once every
	// component is Ready (see memory.go).
	ReleaseStartupPages bool

	// Enabled lists the components to run, by Name.
	Enabled map[string]bool

	StateDir   string // survives reboots: IPAM store
	RunDir     string // cleared on reboot: node network config for the CNI plugin
	CNIConfDir string
	CNIBinDir  string
	// BinaryPath is the running knit binary, linked into CNIBinDir as the plugin.
	BinaryPath string

	// Per-component settings, parsed from flags by package command.
	Component ComponentConfig

	// Version is the knit version, reported in the status document.
	Version string
	// StatusNamespace holds this node's status Lease (package status);
	// empty disables publishing it.
	StatusNamespace string
}

// Agent is a running knit agent.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	reg   *prometheus.Registry
	conn  *cluster.Connection
	cache *cluster.Cache
	sup   *supervisor
	comps []Component

	nodeIPs []netip.Addr
	overlay *overlay.Overlay // set when the overlay is enabled; cni asks it for the MTU

	started    time.Time
	healthAddr atomic.Value // string: the bound health listener address
}

// New connects to the API server and builds the enabled components. Nothing
// is started until Run.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("node name is required (--node-name or NODE_NAME)")
	}
	conn, err := cluster.Connect(cfg.Kubeconfig, log)
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return newWithConnection(cfg, conn, log)
}

func newWithConnection(cfg Config, conn *cluster.Connection, log *slog.Logger) (*Agent, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a := &Agent{
		cfg:   cfg,
		log:   log,
		reg:   reg,
		conn:  conn,
		cache: cluster.New(conn.Client, 0, log),
		sup:   newSupervisor(log, reg),
	}
	a.healthAddr.Store(cfg.HealthAddr)
	a.nodeIPs = cfg.NodeIPs
	if len(a.nodeIPs) == 0 {
		ips, err := lookupNodeIPs(conn.Client, cfg.NodeName, log)
		if err != nil {
			return nil, err
		}
		a.nodeIPs = ips
	}
	for _, b := range builders {
		if !cfg.Enabled[b.name] {
			continue
		}
		c, err := b.build(a)
		if err != nil {
			return nil, fmt.Errorf("component %s: %w", b.name, err)
		}
		a.comps = append(a.comps, c)
	}
	return a, nil
}

// Run starts the cache, the components and the health server, and blocks
// until ctx is done and everything has stopped.
func (a *Agent) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", a.cfg.HealthAddr)
	if err != nil {
		return fmt.Errorf("health listener: %w", err)
	}
	a.started = time.Now()
	a.healthAddr.Store(ln.Addr().String())
	srv := &http.Server{Handler: a.healthMux(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("health server", "err", err)
		}
	}()
	a.log.Info("agent starting", "node", a.cfg.NodeName, "components", a.componentNames(), "health", ln.Addr().String())
	a.tuneGC()
	if a.cfg.ReleaseStartupPages {
		go a.releaseStartupPagesWhenReady(ctx)
	}

	// A node whose address changes must not keep watching through a dead
	// connection from the old one.
	go a.conn.WatchLocalAddresses(ctx)
	// Components created their informers in New; start them all at once.
	a.cache.Start(ctx)
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		if a.cfg.StatusNamespace != "" {
			a.publishStatus(ctx)
		}
	}()
	a.sup.run(ctx, a.comps)
	<-pubDone

	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx)
	a.cache.Shutdown()
	a.log.Info("agent stopped; data plane left in place")
	return nil
}

func (a *Agent) componentNames() []string {
	var names []string
	for _, c := range a.comps {
		names = append(names, c.Name())
	}
	return names
}

func (a *Agent) healthMux() *http.ServeMux { return a.healthMuxFor(a.inspector()) }

// healthMuxFor builds the health listener's routes; inspect serves `knit
// doctor`'s node-side report (nil: not available).
func (a *Agent) healthMuxFor(inspect http.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		// Liveness: the process answers. It deliberately does not depend on
		// the API server or on component readiness: restarting the agent
		// because the API server is down would help nothing.
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		notReady := a.notReady()
		if len(notReady) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %s\n", strings.Join(notReady, ", "))
		} else {
			fmt.Fprintln(w, "ok")
		}
		// Warnings do not make the agent unready, but an operator
		// checking readiness should see them.
		for _, c := range a.comps {
			if wc, ok := c.(interface{ Warnings() []string }); ok {
				for _, warning := range wc.Warnings() {
					fmt.Fprintf(w, "warning: %s: %s\n", c.Name(), warning)
				}
			}
		}
	})
	mux.Handle("/metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{Registry: a.reg}))
	if a.cfg.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index) // heap, allocs, goroutine, ... by name
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	// What `knit status` and `knit doctor` read (package status, doctor).
	mux.HandleFunc("GET /status", a.serveStatus)
	if inspect == nil {
		inspect = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "not available on this agent", http.StatusNotImplemented)
		})
	}
	mux.Handle("GET /debug/service/{namespace}/{name}", inspect)
	return mux
}

// notReady lists the enabled components that are not Ready, sorted.
func (a *Agent) notReady() []string {
	var out []string
	for _, c := range a.comps {
		ok := c.Ready()
		v := 0.0
		if ok {
			v = 1
		}
		a.sup.up.WithLabelValues(c.Name()).Set(v)
		if !ok {
			name := c.Name()
			if e := a.sup.lastError(name); e != "" {
				name += " (last error: " + e + ")"
			}
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// lookupNodeIPs reads the node's InternalIPs (then ExternalIPs) from its
// Node object, retrying for a minute: at boot the agent may start before
// the API server answers.
func lookupNodeIPs(client kubernetes.Interface, node string, log *slog.Logger) ([]netip.Addr, error) {
	var ips []netip.Addr
	var lastErr error
	err := wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		n, err := client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			lastErr = err
			return false, nil
		}
		for _, typ := range []corev1.NodeAddressType{corev1.NodeInternalIP, corev1.NodeExternalIP} {
			for _, addr := range n.Status.Addresses {
				if addr.Type != typ {
					continue
				}
				if ip, err := netip.ParseAddr(addr.Address); err == nil {
					ips = append(ips, ip)
				}
			}
			if len(ips) > 0 {
				return true, nil
			}
		}
		lastErr = fmt.Errorf("node %s has no InternalIP or ExternalIP address", node)
		return false, nil
	})
	if err != nil {
		return nil, fmt.Errorf("node IPs: %w (use --node-ip)", lastErr)
	}
	log.Info("node addresses", "node", node, "ips", ips)
	return ips, nil
}
