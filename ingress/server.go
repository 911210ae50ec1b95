package ingress

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// server is the data plane: the listeners, the connections on them, the
// current routing table and the upstream pools. The sync loop only ever
// touches it through swap.
type server struct {
	set *settings
	log *slog.Logger
	m   *metrics

	table atomic.Pointer[table]
	ups   *upstreams
	slow  *slowPath

	defaultCert *tls.Certificate
	tlsConfig   *tls.Config
	h2          *http.Server
	h2ln        *chanListener

	closing   atomic.Bool
	listeners []net.Listener
	httpLn    net.Listener
	httpsLn   net.Listener

	mu    sync.Mutex
	conns map[*clientConn]struct{}
	wg    sync.WaitGroup
}

func newServer(cfg *Config, m *metrics, log *slog.Logger) (*server, error) {
	set := newSettings(cfg)
	cert, err := selfSignedCert(cfg.NodeName)
	if err != nil {
		return nil, err
	}
	s := &server{
		set:         set,
		log:         log,
		m:           m,
		ups:         newUpstreams(set, m, log),
		defaultCert: cert,
		conns:       map[*clientConn]struct{}{},
	}
	s.tlsConfig = &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: s.getCertificate,
	}
	s.slow = newSlowPath(s)
	s.h2ln = newChanListener()
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetHTTP2(true)
	s.h2 = &http.Server{
		Handler:           s.slow,
		TLSConfig:         s.tlsConfig,
		Protocols:         &protos,
		ReadHeaderTimeout: set.readHeaderTimeout,
		IdleTimeout:       set.idleTimeout,
		MaxHeaderBytes:    set.maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				m.activeConns.Inc()
			case http.StateClosed, http.StateHijacked:
				m.activeConns.Dec()
			}
		},
	}
	return s, nil
}

// swap publishes a new table.
func (s *server) swap(t *table) {
	s.table.Store(t)
	s.m.swaps.Inc()
	s.m.routes.Set(float64(t.routes))
}

func (s *server) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	if t := s.table.Load(); t != nil && name != "" {
		if c := t.certs.cert(name); c != nil {
			return c, nil
		}
	}
	return s.defaultCert, nil
}

// listen binds the listeners; serving starts with serve.
func (s *server) listen(httpAddr, httpsAddr string) error {
	var lc net.ListenConfig
	if httpAddr != "" {
		ln, err := lc.Listen(context.Background(), "tcp", httpAddr)
		if err != nil {
			return err
		}
		s.httpLn = ln
		s.listeners = append(s.listeners, ln)
	}
	if httpsAddr != "" {
		ln, err := lc.Listen(context.Background(), "tcp", httpsAddr)
		if err != nil {
			s.closeListeners()
			return err
		}
		s.httpsLn = ln
		s.listeners = append(s.listeners, ln)
	}
	return nil
}

func (s *server) closeListeners() {
	for _, ln := range s.listeners {
		_ = ln.Close()
	}
}

// serve starts the accept loops and the upstream janitor.
func (s *server) serve(ctx context.Context) {
	if s.httpLn != nil {
		go s.acceptLoop(s.httpLn, false)
	}
	if s.httpsLn != nil {
		go s.acceptLoop(s.httpsLn, true)
		go func() {
			if err := s.h2.Serve(s.h2ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				s.log.Error("HTTP/2 server stopped", "err", err)
			}
		}()
	}
	go s.janitor(ctx)
}

func (s *server) janitor(ctx context.Context) {
	t := time.NewTicker(s.set.upstreamIdleTimeout / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.ups.closeIdle(false)
		}
	}
}

func (s *server) acceptLoop(ln net.Listener, https bool) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.closing.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait, do not spin.
			if backoff == 0 {
				backoff = 5 * time.Millisecond
			} else if backoff < time.Second {
				backoff *= 2
			}
			s.log.Warn("accept failed", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.wg.Add(1)
		go s.handleConn(c, https)
	}
}

func (s *server) handleConn(c net.Conn, https bool) {
	defer s.wg.Done()
	s.m.activeConns.Inc()
	defer s.m.activeConns.Dec()
	if https {
		tc := tls.Server(c, s.tlsConfig)
		_ = c.SetDeadline(deadline(s.set.readHeaderTimeout))
		if err := tc.Handshake(); err != nil {
			_ = c.Close()
			return
		}
		_ = c.SetDeadline(time.Time{})
		if tc.ConnectionState().NegotiatedProtocol == "h2" {
			// HTTP/2 is net/http's; its ConnState hook counts the
			// connection from here on.
			s.h2ln.push(tc)
			return
		}
		c = tc
	}
	cc := s.newClientConn(c, https)
	if !s.track(cc) {
		_ = c.Close()
		cc.release()
		return
	}
	cc.serve()
	s.untrack(cc)
	_ = c.Close()
	cc.release()
}

func (s *server) track(cc *clientConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	s.conns[cc] = struct{}{}
	return true
}

func (s *server) untrack(cc *clientConn) {
	s.mu.Lock()
	delete(s.conns, cc)
	s.mu.Unlock()
}

// shutdown stops accepting, lets requests in flight finish for up to
// grace, then closes what is left.
func (s *server) shutdown(grace time.Duration) {
	s.mu.Lock()
	s.closing.Store(true)
	s.mu.Unlock()
	s.closeListeners()
	s.h2ln.Close()
	// Idle keep-alive connections are woken so they close now.
	s.mu.Lock()
	for cc := range s.conns {
		if cc.idle.Load() {
			_ = cc.c.SetReadDeadline(time.Now())
		}
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	h2done := make(chan struct{})
	go func() {
		_ = s.h2.Shutdown(ctx)
		close(h2done)
	}()
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.mu.Lock()
		for cc := range s.conns {
			_ = cc.c.Close()
			if t := cc.tunnel.Load(); t != nil {
				_ = (*t).Close()
			}
		}
		s.mu.Unlock()
		<-done
	}
	_ = s.h2.Close()
	<-h2done
	s.ups.closeIdle(true)
	s.slow.closeIdle()
}

// chanListener hands connections accepted (and TLS-negotiated) by knit's
// own accept loop to net/http's HTTP/2 server.
type chanListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

func (l *chanListener) push(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		_ = c.Close()
	}
}
