package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// forwarder sends what is not ours to the node's upstream resolvers.
//
// Upstreams are tried in order, skipping those marked down; a network error
// or timeout moves on to the next. Three failures in a row mark an upstream
// down; a checker revives it when it answers again. With every upstream down
// a query fails at once (SERVFAIL) instead of waiting for timeouts, while the
// cache keeps serving what it has until it expires.
//
// Identical questions in flight share one upstream query. At most
// MaxConcurrentForwards queries wait on upstreams at once.
type forwarder struct {
	log       *slog.Logger
	upstreams []*upstream
	timeout   time.Duration
	udpSize   uint16
	cache     *cache
	m         *metrics

	sem chan struct{}

	mu       sync.Mutex
	inflight map[string]*call

	// Loop detection: probe names in flight, each naming its upstream.
	probeMu sync.Mutex
	probes  map[string]*upstream
	probing atomic.Bool
}

type upstream struct {
	addr    string
	ap      netip.AddrPort
	udp     *mdns.Client
	tcp     *mdns.Client
	fails   atomic.Int32
	down    atomic.Bool
	looping atomic.Bool
	latency prometheus.Observer
	errors  prometheus.Counter
	healthy prometheus.Gauge
}

type call struct {
	done chan struct{}
	e    *centry
	err  error
}

const failuresToDown = 3

var (
	errNoUpstream = errors.New("no usable upstream")
	errBusy       = errors.New("too many queries in flight upstream")
)

// newForwarder checks the upstream list: an upstream that is one of our own
// listen or local addresses would be a forwarding loop and is refused.
func newForwarder(cfg Config, c *cache, m *metrics, log *slog.Logger) (*forwarder, error) {
	f := &forwarder{
		log:      log,
		timeout:  cfg.UpstreamTimeout,
		udpSize:  uint16(cfg.UDPSize),
		cache:    c,
		m:        m,
		sem:      make(chan struct{}, cfg.MaxConcurrentForwards),
		inflight: map[string]*call{},
		probes:   map[string]*upstream{},
	}
	addrs := cfg.Upstreams
	if len(addrs) == 0 {
		servers, note, err := ReadResolvConf(cfg.ResolvConf)
		if err != nil {
			log.Warn("no upstream resolvers: names outside the cluster will get SERVFAIL", "resolvConf", cfg.ResolvConf, "err", err)
		}
		if note != "" {
			log.Info("upstream resolvers", "note", note)
		}
		addrs = servers
	}
	seen := map[netip.AddrPort]bool{}
	for _, s := range addrs {
		ap, err := parseUpstream(s)
		if err != nil {
			return nil, err
		}
		if seen[ap] {
			continue
		}
		seen[ap] = true
		if reason := selfAddress(ap, cfg); reason != "" {
			log.Error("refusing upstream: forwarding there would loop back to this server", "upstream", ap.String(), "reason", reason)
			m.loops.Inc()
			continue
		}
		u := &upstream{
			addr:    ap.String(),
			ap:      ap,
			udp:     &mdns.Client{Net: "udp", Timeout: cfg.UpstreamTimeout, UDPSize: uint16(cfg.UDPSize)},
			tcp:     &mdns.Client{Net: "tcp", Timeout: cfg.UpstreamTimeout},
			latency: m.upstreamLatency.WithLabelValues(ap.String()),
			errors:  m.upstreamErrors.WithLabelValues(ap.String()),
			healthy: m.upstreamHealthy.WithLabelValues(ap.String()),
		}
		u.healthy.Set(1)
		f.upstreams = append(f.upstreams, u)
	}
	if len(f.upstreams) == 0 && len(addrs) > 0 {
		log.Error("every upstream refused: names outside the cluster will get SERVFAIL", "upstreams", addrs)
	}
	return f, nil
}

// selfAddress says why ap is this server itself, or "".
func selfAddress(ap netip.AddrPort, cfg Config) string {
	a := ap.Addr().Unmap()
	if a.IsUnspecified() {
		return "unspecified address"
	}
	for _, l := range cfg.ListenAddrs {
		la := l.Addr().Unmap()
		if l.Port() != ap.Port() {
			continue
		}
		if la == a {
			return "it is a listen address of this server"
		}
		if la.IsUnspecified() && a.IsLoopback() {
			return "this server listens on every address, loopback included"
		}
	}
	for _, l := range cfg.LocalIPs {
		if l.Unmap() == a {
			return "it is the cluster DNS address this server answers on"
		}
	}
	return ""
}

// acquire takes a forwarding slot without waiting.
func (f *forwarder) acquire() bool {
	select {
	case f.sem <- struct{}{}:
		return true
	default:
		f.m.forwardRejected.Inc()
		return false
	}
}

func (f *forwarder) release() { <-f.sem }

// usable reports whether some upstream may be tried now.
func (f *forwarder) usable() bool {
	for _, u := range f.upstreams {
		if !u.down.Load() && !u.looping.Load() {
			return true
		}
	}
	return false
}

// resolve answers the question of m (a query whose ID and OPT the caller
// set) from upstreams, sharing the work with identical queries in flight,
// and caches the answer. key is the cache key of the question.
func (f *forwarder) resolve(ctx context.Context, key string, m *mdns.Msg) (*centry, error) {
	f.mu.Lock()
	if c, ok := f.inflight[key]; ok {
		f.mu.Unlock()
		select {
		case <-c.done:
			return c.e, c.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	c := &call{done: make(chan struct{})}
	f.inflight[key] = c
	f.mu.Unlock()

	c.e, c.err = f.resolveUncached(ctx, key, m)

	f.mu.Lock()
	delete(f.inflight, key)
	f.mu.Unlock()
	close(c.done)
	return c.e, c.err
}

func (f *forwarder) resolveUncached(ctx context.Context, key string, m *mdns.Msg) (*centry, error) {
	r, err := f.exchange(ctx, m)
	if err != nil {
		return nil, err
	}
	e, ttl, err := f.cache.entryFor(r, time.Now())
	if err != nil {
		return nil, err
	}
	if ttl > 0 {
		f.cache.put(key, e)
	}
	return e, nil
}

// exchange sends m to the first upstream that answers, retrying over TCP
// when the UDP answer is truncated.
func (f *forwarder) exchange(ctx context.Context, m *mdns.Msg) (*mdns.Msg, error) {
	if len(m.Question) != 1 {
		return nil, errBadMessage
	}
	var lastErr error = errNoUpstream
	tried := 0
	for _, u := range f.upstreams {
		if u.down.Load() || u.looping.Load() {
			continue
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		tried++
		r, err := f.exchangeOne(ctx, u, m)
		if err == nil {
			return r, nil
		}
		lastErr = err
	}
	if tried == 0 {
		return nil, errNoUpstream
	}
	return nil, lastErr
}

func (f *forwarder) exchangeOne(ctx context.Context, u *upstream, m *mdns.Msg) (*mdns.Msg, error) {
	start := time.Now()
	m.Id = mdns.Id()
	r, _, err := u.udp.ExchangeContext(ctx, m, u.addr)
	if err == nil && r.Truncated {
		m.Id = mdns.Id()
		r, _, err = u.tcp.ExchangeContext(ctx, m, u.addr)
	}
	if err == nil {
		err = checkAnswer(m, r)
	}
	u.latency.Observe(time.Since(start).Seconds())
	if err != nil {
		u.errors.Inc()
		if ctx.Err() == nil && u.fails.Add(1) >= failuresToDown && !u.down.Swap(true) {
			u.healthy.Set(0)
			f.log.Warn("upstream down; skipping it until it answers again", "upstream", u.addr, "err", err)
		}
		return nil, fmt.Errorf("upstream %s: %w", u.addr, err)
	}
	u.fails.Store(0)
	return r, nil
}

// checkAnswer makes sure r answers q: a response to a different question is
// a cache-poisoning attempt or a broken upstream.
func checkAnswer(q, r *mdns.Msg) error {
	if !r.Response || len(r.Question) != 1 {
		return errors.New("not a response to one question")
	}
	a, b := q.Question[0], r.Question[0]
	if a.Qtype != b.Qtype || a.Qclass != b.Qclass || !strings.EqualFold(a.Name, b.Name) {
		return fmt.Errorf("answer to another question: %s", b.String())
	}
	return nil
}

// runHealth revives upstreams marked down once they answer a probe.
func (f *forwarder) runHealth(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, u := range f.upstreams {
			if !u.down.Load() || u.looping.Load() {
				continue
			}
			m := new(mdns.Msg)
			m.SetQuestion(".", mdns.TypeNS)
			m.Id = mdns.Id()
			cctx, cancel := context.WithTimeout(ctx, f.timeout)
			r, _, err := u.udp.ExchangeContext(cctx, m, u.addr)
			cancel()
			if err == nil && r.Response {
				u.fails.Store(0)
				u.down.Store(false)
				u.healthy.Set(1)
				f.log.Info("upstream answers again", "upstream", u.addr)
			}
		}
	}
}

// probeLoops sends each upstream a query for a random name under
// knit-loop-probe. (as CoreDNS's loop plugin does). If that query comes back
// to this server, the upstream forwards to us: it is marked looping and never
// used again. Called once the listeners are up.
func (f *forwarder) probeLoops(ctx context.Context) {
	if len(f.upstreams) == 0 {
		return
	}
	names := make(map[*upstream]string, len(f.upstreams))
	f.probeMu.Lock()
	for _, u := range f.upstreams {
		n := fmt.Sprintf("%d.%d.knit-loop-probe.", rand.Uint64(), rand.Uint64())
		names[u] = n
		f.probes[n] = u
	}
	f.probeMu.Unlock()
	f.probing.Store(true)
	var wg sync.WaitGroup
	for u, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := new(mdns.Msg)
			m.SetQuestion(n, mdns.TypeHINFO)
			m.Id = mdns.Id()
			cctx, cancel := context.WithTimeout(ctx, 2*f.timeout)
			defer cancel()
			_, _, _ = u.udp.ExchangeContext(cctx, m, u.addr)
		}()
	}
	wg.Wait()
	// Give a slow relay a moment longer before forgetting the names.
	select {
	case <-ctx.Done():
	case <-time.After(f.timeout):
	}
	f.probing.Store(false)
	f.probeMu.Lock()
	clear(f.probes)
	f.probeMu.Unlock()
}

// sawProbe is called for every query while probing; it reports whether the
// query is one of our probes come back, and marks its upstream looping.
func (f *forwarder) sawProbe(name string) bool {
	f.probeMu.Lock()
	u, ok := f.probes[name]
	f.probeMu.Unlock()
	if !ok {
		return false
	}
	if !u.looping.Swap(true) {
		u.healthy.Set(0)
		f.m.loops.Inc()
		f.log.Error("forwarding loop detected: the upstream sends our own queries back to this server; refusing it "+
			"(on systemd-resolved nodes point upstreams at /run/systemd/resolve/resolv.conf, not the 127.0.0.53 stub)",
			"upstream", u.addr, "probe", name)
	}
	return true
}
