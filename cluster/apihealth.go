package cluster

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Why a health gate: when the API server goes away, every reflector's list
// fails at once and client-go backs off exponentially (0.8 s doubling to a
// 30 s cap, with up to 100% jitter). Measured in this lab, kube-proxy stayed
// blind to new Services for 47-59 s after the server came back. knit instead
// notices the outage in the transport, probes /readyz every probeInterval,
// and holds list/watch requests until the server answers again. A held
// request is not a failed one, so the reflector's backoff does not grow, and
// every informer reconnects within about one probe interval of the server's
// return.

const (
	probeInterval = 250 * time.Millisecond
	// maxHold bounds how long one request waits for the server, so a request
	// never hangs forever on a server that is gone for good.
	maxHold = 2 * time.Minute
)

// apiHealth tracks whether the API server is reachable.
type apiHealth struct {
	probe func(ctx context.Context) error
	log   *slog.Logger

	mu   sync.Mutex
	down bool
	up   chan struct{} // closed when the server is back; replaced on each outage
}

func newAPIHealth(probe func(ctx context.Context) error, log *slog.Logger) *apiHealth {
	up := make(chan struct{})
	close(up)
	return &apiHealth{probe: probe, log: log, up: up}
}

// markDown records an outage and starts the probe loop if it is not running.
func (h *apiHealth) markDown(cause error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		return
	}
	h.down = true
	h.up = make(chan struct{})
	h.log.Warn("API server unreachable; holding list/watch until it answers", "err", cause)
	go h.probeUntilUp()
}

func (h *apiHealth) probeUntilUp() {
	start := time.Now()
	for {
		time.Sleep(probeInterval)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := h.probe(ctx)
		cancel()
		if err == nil {
			break
		}
	}
	h.mu.Lock()
	h.down = false
	close(h.up)
	h.mu.Unlock()
	h.log.Info("API server reachable again", "outage", time.Since(start).Round(time.Millisecond))
}

// wait blocks while the server is down, up to maxHold or ctx's end.
func (h *apiHealth) wait(ctx context.Context) {
	h.mu.Lock()
	up := h.up
	h.mu.Unlock()
	t := time.NewTimer(maxHold)
	defer t.Stop()
	select {
	case <-up:
	case <-ctx.Done():
	case <-t.C:
	}
}

// Down reports whether the server is currently believed unreachable.
func (h *apiHealth) Down() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.down
}

// gatedTransport holds GET requests (lists and watches) while the server is
// down and reports connection failures to the health tracker. Writes are not
// held: their callers have their own retry policy and must not be delayed
// silently.
type gatedTransport struct {
	next   http.RoundTripper
	health *apiHealth
}

func (t *gatedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	get := req.Method == http.MethodGet && req.Body == nil
	if get {
		t.health.wait(req.Context())
	}
	resp, err := t.next.RoundTrip(req)
	if err != nil && isConnError(err) && req.Context().Err() == nil {
		t.health.markDown(err)
		if get {
			// The GET that found the server gone is held too, and sent
			// again once it is back: every failure client-go sees grows
			// its reflector's backoff, which it waits out again after the
			// relist that follows the outage (measured: new objects live
			// 2-4 s after the server's return with this first failure
			// counted).
			t.health.wait(req.Context())
			if req.Context().Err() == nil {
				resp, err = t.next.RoundTrip(req.Clone(req.Context()))
				if err != nil && isConnError(err) && req.Context().Err() == nil {
					t.health.markDown(err)
				}
			}
		}
	}
	return resp, err
}

// isConnError is true for errors that mean "nobody answered", as opposed to
// an HTTP-level failure or our own cancellation.
func isConnError(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	var op *net.OpError
	if errors.As(err, &op) {
		return true
	}
	return errors.Is(err, net.ErrClosed) || errors.Is(err, context.DeadlineExceeded)
}

// Connection is an API client whose list/watch traffic is health-gated and
// whose connections are closed when their local address goes away (see
// localaddr.go and WatchLocalAddresses).
type Connection struct {
	Client kubernetes.Interface
	Config *rest.Config
	health *apiHealth
	conns  *connTracker
	log    *slog.Logger
}

// WatchLocalAddresses closes, until ctx is done, the API connections whose
// local address this node no longer has, so that client-go reconnects from
// the address it has now instead of waiting for its HTTP/2 health check.
func (c *Connection) WatchLocalAddresses(ctx context.Context) {
	if c.conns == nil {
		return // not made by Connect
	}
	changed, poll := addrDeletions(ctx, c.log), localAddrFallback
	if changed == nil {
		poll = localAddrPoll
	}
	c.conns.watch(ctx, net.InterfaceAddrs, changed, poll, c.log)
}

// APIServerDown reports whether the API server is believed unreachable now.
func (c *Connection) APIServerDown() bool { return c.health.Down() }

// Connect builds a client from kubeconfig, or from the in-cluster service
// account when kubeconfig is empty.
func Connect(kubeconfig string, log *slog.Logger) (*Connection, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, err
	}
	return ConnectConfig(cfg, log)
}

// ConnectConfig is Connect for an existing rest.Config.
func ConnectConfig(cfg *rest.Config, log *slog.Logger) (*Connection, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.UserAgent = "knit"
	// The agent lists a few resource types on start and then only watches;
	// the defaults (5 qps) would make a 10,000-Service start needlessly slow.
	cfg.QPS, cfg.Burst = 50, 100
	// The probe's connections too: a dead one would fail every probe.
	conns := newConnTracker(cfg.Dial)
	cfg.Dial = conns.DialContext
	probeClient, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	health := newAPIHealth(func(ctx context.Context) error {
		return probeClient.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Error()
	}, log)
	gated := rest.CopyConfig(cfg)
	gated.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return &gatedTransport{next: rt, health: health}
	})
	client, err := kubernetes.NewForConfig(gated)
	if err != nil {
		return nil, err
	}
	return &Connection{Client: client, Config: gated, health: health, conns: conns, log: log}, nil
}
