package ingress

import (
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// upstream is one endpoint (pod IP and port): its idle keep-alive
// connections, its in-flight count for balancing, and its passive health.
// Upstreams outlive tables: the registry hands the same *upstream to every
// table that names the endpoint, so a config swap keeps warm connections
// and health state.
type upstream struct {
	addr string // "10.42.1.7:8080" or "[fd42::7]:8080"
	h2c  bool
	reg  *upstreams

	inflight     atomic.Int32
	fails        atomic.Int32 // consecutive connection failures
	ejectedUntil atomic.Int64 // unix nanoseconds; 0: not ejected

	mu     sync.Mutex
	idle   []*upConn // LIFO: the most recently used connection is warmest
	closed bool

	gen uint64 // last table generation naming it; owned by the sync loop
}

// upConn is a keep-alive connection to an upstream.
type upConn struct {
	c      net.Conn
	rd     reader
	up     *upstream
	idleAt int64 // unix nanoseconds when it went idle
}

// upstreams is the registry of upstreams by address, owned by the sync
// loop (get, prune) and shared with the janitor.
type upstreams struct {
	set *settings
	log *slog.Logger
	m   *metrics

	mu  sync.Mutex
	all map[string]*upstream
}

func newUpstreams(set *settings, m *metrics, log *slog.Logger) *upstreams {
	return &upstreams{set: set, m: m, log: log, all: map[string]*upstream{}}
}

// get returns the upstream for addr, creating it, and marks it as used by
// table generation gen.
func (r *upstreams) get(addr string, h2c bool, gen uint64) *upstream {
	key := addr
	if h2c {
		key = "h2c|" + addr
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	u := r.all[key]
	if u == nil {
		u = &upstream{addr: addr, h2c: h2c, reg: r}
		r.all[key] = u
	}
	u.gen = gen
	return u
}

// prune drops the upstreams the newest table (generation gen) no longer
// names. Requests still using one finish normally; its connections are
// closed as they come back.
func (r *upstreams) prune(gen uint64) {
	var gone []*upstream
	r.mu.Lock()
	for k, u := range r.all {
		if u.gen != gen {
			delete(r.all, k)
			gone = append(gone, u)
		}
	}
	r.mu.Unlock()
	for _, u := range gone {
		u.close()
	}
}

// closeIdle closes idle connections older than the idle timeout; all of
// them if all is set (shutdown).
func (r *upstreams) closeIdle(all bool) {
	r.mu.Lock()
	ups := make([]*upstream, 0, len(r.all))
	for _, u := range r.all {
		ups = append(ups, u)
	}
	r.mu.Unlock()
	cutoff := time.Now().UnixNano() - int64(r.set.upstreamIdleTimeout)
	for _, u := range ups {
		var old []*upConn
		u.mu.Lock()
		k := 0
		for k < len(u.idle) && (all || u.idle[k].idleAt < cutoff) {
			k++
		}
		if k > 0 {
			old = append(old, u.idle[:k]...)
			n := copy(u.idle, u.idle[k:])
			clear(u.idle[n:])
			u.idle = u.idle[:n]
		}
		u.mu.Unlock()
		for _, c := range old {
			c.close()
		}
	}
}

func (u *upstream) close() {
	u.mu.Lock()
	u.closed = true
	idle := u.idle
	u.idle = nil
	u.mu.Unlock()
	for _, c := range idle {
		c.close()
	}
}

// getIdle pops the warmest idle connection, or returns nil.
func (u *upstream) getIdle() *upConn {
	now := time.Now().UnixNano()
	cutoff := now - int64(u.reg.set.upstreamIdleTimeout)
	u.mu.Lock()
	n := len(u.idle)
	if n == 0 {
		u.mu.Unlock()
		return nil
	}
	c := u.idle[n-1]
	u.idle[n-1] = nil
	u.idle = u.idle[:n-1]
	if c.idleAt >= cutoff {
		u.mu.Unlock()
		return c
	}
	// The top one is expired, so all below are too.
	old := u.idle
	u.idle = u.idle[:0]
	u.mu.Unlock()
	c.close()
	for i, o := range old {
		o.close()
		old[i] = nil
	}
	return nil
}

// put returns a connection whose last response was read completely.
func (u *upstream) put(c *upConn) {
	c.idleAt = time.Now().UnixNano()
	u.mu.Lock()
	if u.closed || len(u.idle) >= u.reg.set.maxIdlePerEndpoint {
		u.mu.Unlock()
		c.close()
		return
	}
	u.idle = append(u.idle, c)
	u.mu.Unlock()
}

// dial opens a new connection.
func (u *upstream) dial() (*upConn, error) {
	d := net.Dialer{Timeout: u.reg.set.connectTimeout, KeepAlive: 30 * time.Second}
	c, err := d.Dial("tcp", u.addr)
	if err != nil {
		return nil, err
	}
	u.reg.m.upstreamDials.Inc()
	uc := &upConn{c: c, up: u}
	uc.rd = reader{c: c, buf: upBufPool.Get().([]byte)}
	return uc, nil
}

// alive checks, without blocking, that an idle connection was not closed
// (or written to) by the upstream while it sat in the pool. It costs a
// syscall, so it is only used before sending a request that cannot be
// retried.
func (c *upConn) alive() bool {
	sc, ok := c.c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	ok = false
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		_ = n
		ok = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
		return true
	})
	return err == nil && ok
}

func (c *upConn) close() {
	_ = c.c.Close()
	if c.rd.buf != nil && len(c.rd.buf) == upBufSize {
		upBufPool.Put(c.rd.buf) //nolint:staticcheck // a slice header is fine here
	}
	c.rd.buf = nil
}

const upBufSize = 8 << 10

var upBufPool = sync.Pool{New: func() any { return make([]byte, upBufSize) }}

// failure records a failed connection attempt or a connection that broke
// before answering. After ejectAfter in a row the endpoint is ejected for
// ejectFor; when it comes back one more failure ejects it again.
func (u *upstream) failure() {
	set := u.reg.set
	if u.fails.Add(1) < int32(set.ejectAfter) {
		return
	}
	until := time.Now().Add(set.ejectFor).UnixNano()
	u.ejectedUntil.Store(until)
	u.fails.Store(int32(set.ejectAfter) - 1)
	u.reg.m.ejections.Inc()
	u.reg.log.Warn("upstream ejected after connection failures", "endpoint", u.addr, "for", set.ejectFor)
}

// success clears the failure streak.
func (u *upstream) success() {
	if u.fails.Load() != 0 {
		u.fails.Store(0)
	}
	if u.ejectedUntil.Load() != 0 {
		u.ejectedUntil.Store(0)
	}
}

func (u *upstream) ejected(now int64) bool {
	t := u.ejectedUntil.Load()
	return t != 0 && now < t
}

const maxTries = 4

// pick chooses an endpoint by the power of two choices: two random
// endpoints, the one with fewer requests in flight. Ejected endpoints and
// those already tried for this request are avoided while others remain;
// when every endpoint is ejected they are used anyway (a guess beats a
// certain 503).
func (b *backend) pick(tried []*upstream) *upstream {
	eps := b.eps
	n := len(eps)
	switch n {
	case 0:
		return nil
	case 1:
		return eps[0]
	}
	now := int64(0)
	usable := func(u *upstream) bool {
		for _, t := range tried {
			if t == u {
				return false
			}
		}
		if u.ejectedUntil.Load() == 0 {
			return true
		}
		if now == 0 {
			now = time.Now().UnixNano()
		}
		return !u.ejected(now)
	}
	i := rand.IntN(n)
	j := rand.IntN(n - 1)
	if j >= i {
		j++
	}
	a, c := eps[i], eps[j]
	aok, cok := usable(a), usable(c)
	switch {
	case aok && cok:
		if c.inflight.Load() < a.inflight.Load() {
			return c
		}
		return a
	case aok:
		return a
	case cok:
		return c
	}
	for k := 1; k < n; k++ {
		if u := eps[(i+k)%n]; usable(u) {
			return u
		}
	}
	// Everything is ejected or tried: prefer one not tried yet.
	for k := 0; k < n; k++ {
		u := eps[(i+k)%n]
		seen := false
		for _, t := range tried {
			seen = seen || t == u
		}
		if !seen {
			return u
		}
	}
	return a
}
