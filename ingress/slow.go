package ingress

import (
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The slow path is net/http's: it serves HTTP/2 clients (TLS with ALPN
// "h2") through httputil.ReverseProxy, and carries requests to backends
// that speak h2c (appProtocol kubernetes.io/h2c, e.g. gRPC) through an
// HTTP/2 Transport, for clients of either path. It shares the routing
// table, endpoint choice, passive health and retry policy with the fast
// path; only the wire handling differs.

type slowPath struct {
	s   *server
	h1  *http.Transport
	h2c *http.Transport
	rp  *httputil.ReverseProxy
}

// slowReq travels in the request context from the handler to RoundTrip.
type slowReq struct {
	rt       *route
	endpoint string
}

type slowReqKey struct{}

var errNoEndpoints = errors.New("no ready endpoints")

func newSlowPath(s *server) *slowPath {
	set := s.set
	d := &net.Dialer{Timeout: set.connectTimeout, KeepAlive: 30 * time.Second}
	newTransport := func() *http.Transport {
		return &http.Transport{
			DialContext:           d.DialContext,
			MaxIdleConnsPerHost:   set.maxIdlePerEndpoint,
			IdleConnTimeout:       set.upstreamIdleTimeout,
			ResponseHeaderTimeout: set.upstreamReadTimeout,
			DisableCompression:    true,
			Protocols:             &http.Protocols{},
		}
	}
	p := &slowPath{s: s, h1: newTransport(), h2c: newTransport()}
	p.h1.Protocols.SetHTTP1(true)
	p.h2c.Protocols.SetUnencryptedHTTP2(true)
	p.h2c.HTTP2 = &http.HTTP2Config{SendPingTimeout: 15 * time.Second, PingTimeout: 15 * time.Second}
	p.rp = &httputil.ReverseProxy{
		Rewrite:      p.rewrite,
		Transport:    p,
		ErrorHandler: p.errorHandler,
		ErrorLog:     s.h2ErrorLog(),
	}
	return p
}

func (p *slowPath) closeIdle() {
	p.h1.CloseIdleConnections()
	p.h2c.CloseIdleConnections()
}

// RoundTrip sends the request to an endpoint of the route's backend,
// retrying on another one when connecting fails (and the request has no
// body, so nothing is lost by sending it again).
func (p *slowPath) RoundTrip(req *http.Request) (*http.Response, error) {
	sr, _ := req.Context().Value(slowReqKey{}).(*slowReq)
	if sr == nil {
		return nil, errors.New("no route in request context")
	}
	be := sr.rt.backend
	set := p.s.set
	replayable := req.Body == nil || req.Body == http.NoBody
	var tried [maxTries]*upstream
	n := 0
	for attempt := 0; ; attempt++ {
		up := be.pick(tried[:n])
		if up == nil {
			return nil, errNoEndpoints
		}
		if n < len(tried) {
			tried[n] = up
			n++
		}
		t := p.h1
		if up.h2c {
			t = p.h2c
		}
		req.URL.Scheme, req.URL.Host = "http", up.addr
		up.inflight.Add(1)
		resp, err := t.RoundTrip(req)
		up.inflight.Add(-1)
		if err == nil {
			up.success()
			sr.endpoint = up.addr
			return resp, nil
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			up.failure()
			if replayable && attempt < set.retries {
				p.s.m.retries.Inc()
				continue
			}
		} else if isTimeout(err) {
			up.failure()
		}
		return nil, err
	}
}

func (p *slowPath) rewrite(pr *httputil.ProxyRequest) {
	pr.Out.URL.Scheme = "http"
	pr.Out.Host = pr.In.Host
	if xff := pr.In.Header["X-Forwarded-For"]; len(xff) > 0 {
		pr.Out.Header["X-Forwarded-For"] = append([]string(nil), strings.Join(xff, ", "))
	}
	pr.SetXForwarded()
	pr.Out.Header.Del("Proxy-Authorization")
	if id := pr.In.Header.Get("X-Request-Id"); id == "" || len(id) > 128 {
		var b [32]byte
		pr.Out.Header.Set("X-Request-Id", string(newRequestID(&b)))
	}
}

func (p *slowPath) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	code, msg := 502, "endpoint failed"
	switch {
	case errors.Is(err, errNoEndpoints):
		code, msg = 503, "no ready endpoints"
	case isTimeout(err):
		code, msg = 504, "endpoint did not answer in time"
	case errors.Is(err, context.Canceled):
		code, msg = 499, "client went away"
	}
	if sr, _ := r.Context().Value(slowReqKey{}).(*slowReq); sr != nil {
		msg += " for " + sr.rt.backend.name
	}
	textResponse(w, code, msg)
}

func textResponse(w http.ResponseWriter, code int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(msg)+1))
	w.WriteHeader(code)
	_, _ = io.WriteString(w, msg+"\n")
}

// statusRecorder remembers the status a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = 200
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// ServeHTTP is the HTTP/2 front: the same routing as the fast path.
func (p *slowPath) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := p.s
	start := time.Now()
	rec := &statusRecorder{ResponseWriter: w}
	var rt *route
	defer func() {
		code := rec.status
		if code == 0 {
			code = 200
		}
		rm := s.m.noRoute
		if rt != nil && rt.metrics != nil {
			rm = rt.metrics
		}
		rm.inc(code)
		s.m.duration.Observe(time.Since(start).Seconds())
		if s.set.accessLog {
			attrs := []any{"method", r.Method, "host", r.Host, "path", r.URL.Path, "status", code,
				"duration", time.Since(start), "bytes", rec.bytes, "client", r.RemoteAddr, "proto", r.Proto}
			if rt != nil {
				attrs = append(attrs, "ingress", rt.ingress, "backend", rt.backend.name)
			}
			s.log.Info("access", attrs...)
		}
	}()
	path, _, _ := strings.Cut(r.RequestURI, "?")
	if path == "" || path[0] != '/' || hasDotSegment([]byte(path)) || strings.ContainsAny(path, " #") {
		textResponse(rec, 400, errBadTarget.msg)
		return
	}
	for i := 0; i < len(r.Host); i++ {
		if !hostByte[r.Host[i]] {
			textResponse(rec, 400, errBadHost.msg)
			return
		}
	}
	t := s.table.Load()
	if t == nil {
		textResponse(rec, 503, "ingress is starting")
		return
	}
	rt = t.lookup(normalizeHost(nil, []byte(r.Host)), []byte(path))
	switch {
	case rt == nil:
		textResponse(rec, 404, "no Ingress rule matches this host and path")
		return
	case rt.backend.kind == kindError:
		textResponse(rec, rt.backend.status, rt.backend.msg)
		return
	case s.set.maxBodyBytes > 0 && r.ContentLength > s.set.maxBodyBytes:
		textResponse(rec, 413, errBodyTooLarge.msg)
		return
	}
	if s.set.maxBodyBytes > 0 && r.Body != nil {
		r.Body = http.MaxBytesReader(rec, r.Body, s.set.maxBodyBytes)
	}
	sr := &slowReq{rt: rt}
	p.rp.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), slowReqKey{}, sr)))
}

// forwardSlow carries a request from the HTTP/1.1 fast path to an h2c
// backend through net/http, and writes the answer back in HTTP/1.1.
func (cc *clientConn) forwardSlow(rt *route, start time.Time) bool {
	req := &cc.req
	s := cc.s
	u, err := url.ParseRequestURI(string(req.path) + string(req.query))
	if err != nil {
		return cc.local(rt, 400, errBadTarget.msg, start)
	}
	hdr := make(http.Header, len(req.headers)+4)
	var xff []string
	for i := range req.headers {
		h := &req.headers[i]
		switch h.kind {
		case hOther:
			if !listedInConnection(req.connTokens, h.name) {
				hdr.Add(string(h.name), string(h.value))
			}
		case hXForwardedFor:
			xff = append(xff, string(h.value))
		}
	}
	xff = append(xff, cc.remoteIP)
	hdr.Set("X-Forwarded-For", strings.Join(xff, ", "))
	hdr.Set("X-Forwarded-Host", string(req.host))
	if cc.https {
		hdr.Set("X-Forwarded-Proto", "https")
	} else {
		hdr.Set("X-Forwarded-Proto", "http")
	}
	if id := req.requestID; len(id) > 0 && len(id) <= 128 {
		hdr.Set("X-Request-Id", string(id))
	} else {
		var b [32]byte
		hdr.Set("X-Request-Id", string(newRequestID(&b)))
	}
	var body *h1Body
	hreq := &http.Request{
		Method:     string(req.method),
		URL:        u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     hdr,
		Host:       string(req.host),
		Body:       http.NoBody,
	}
	if req.hasBody() {
		if req.expect100 && req.http11 {
			if _, err := io.WriteString(cc.c, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
				return false
			}
		}
		body = &h1Body{rd: &cc.rd, left: req.contentLength, chunked: req.chunked,
			limit: s.set.maxBodyBytes, maxTrailer: s.set.maxHeaderBytes}
		cc.rd.refresh = s.set.idleTimeout
		defer func() { cc.rd.refresh = 0 }()
		hreq.Body = body
		hreq.ContentLength = req.contentLength
		if req.chunked {
			hreq.ContentLength = -1
		}
	}
	sr := &slowReq{rt: rt}
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), slowReqKey{}, sr))
	defer cancel()
	resp, err := s.slow.RoundTrip(hreq.WithContext(ctx))
	bodyDone := body == nil || body.finish()
	if err != nil {
		code, msg := 502, "endpoint of "+rt.backend.name+" failed"
		switch {
		case errors.Is(err, errNoEndpoints):
			code, msg = 503, "no ready endpoints for "+rt.backend.name
		case isTimeout(err):
			code, msg = 504, "endpoint of "+rt.backend.name+" did not answer in time"
		}
		return cc.respondLocal(rt, code, msg, start, bodyDone && cc.keepAlive())
	}
	defer resp.Body.Close()
	if s.set.accessLog {
		cc.log.endpoint = sr.endpoint
	}
	keep := cc.keepAlive()
	client11 := req.http11
	isHead := string(req.method) == "HEAD"
	var mode bodyMode
	switch {
	case isHead || resp.StatusCode == 204 || resp.StatusCode == 304:
		mode = bodyNone
	case resp.ContentLength >= 0:
		mode = bodyLength
	case client11:
		mode = bodyEOFChunk
	default:
		mode, keep = bodyEOF, false
	}
	b := cc.w.buf[:0]
	b = append(b, "HTTP/1.1 "...)
	b = append(b, statusText(resp.StatusCode)...)
	b = append(b, ' ')
	if t := http.StatusText(resp.StatusCode); t != "" {
		b = append(b, t...)
	} else {
		b = append(b, reasonPhrase(resp.StatusCode)...)
	}
	b = append(b, "\r\n"...)
	for k, vs := range resp.Header {
		switch http.CanonicalHeaderKey(k) {
		case "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "Te", "Trailer", "Content-Length":
			continue
		}
		for _, v := range vs {
			if strings.ContainsAny(v, "\r\n") {
				continue
			}
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, v...)
			b = append(b, "\r\n"...)
		}
	}
	if mode == bodyLength || (mode == bodyNone && resp.ContentLength > 0 && resp.StatusCode != 204) {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, resp.ContentLength, 10)
		b = append(b, "\r\n"...)
	}
	if mode == bodyEOFChunk {
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	}
	keep = keep && bodyDone
	if !keep {
		b = append(b, "Connection: close\r\n"...)
	} else if !client11 {
		b = append(b, "Connection: keep-alive\r\n"...)
	}
	cc.w.buf = append(b, "\r\n"...)
	cc.w.c, cc.w.err = cc.c, nil
	_ = cc.c.SetWriteDeadline(deadline(s.set.writeTimeout))
	var n int64
	var rerr error
	if mode != bodyNone {
		n, rerr = cc.copyStream(resp.Body, mode == bodyEOFChunk)
	}
	werr := cc.w.flush()
	cc.done(rt, resp.StatusCode, start, n)
	return keep && rerr == nil && werr == nil
}

// copyStream copies a net/http body to the client, flushing after each
// read so streamed responses stream.
func (cc *clientConn) copyStream(src io.Reader, chunk bool) (int64, error) {
	bp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bp)
	buf := *bp
	var n int64
	var hexBuf [20]byte
	for {
		k, err := src.Read(buf)
		if k > 0 {
			if chunk {
				h := strconv.AppendInt(hexBuf[:0], int64(k), 16)
				_ = cc.w.write(append(h, '\r', '\n'))
			}
			_ = cc.w.write(buf[:k])
			if chunk {
				_ = cc.w.writeString("\r\n")
			}
			n += int64(k)
			if werr := cc.w.flush(); werr != nil {
				return n, werr
			}
		}
		if err == io.EOF {
			if chunk {
				_ = cc.w.writeString("0\r\n\r\n")
			}
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// h1Body reads an HTTP/1.1 request body (Content-Length or chunked) from
// the client's buffer for net/http. The Transport may read it from another
// goroutine, so finish waits for any read in progress and stops later ones
// before the connection's buffer is used again.
type h1Body struct {
	mu         sync.Mutex
	rd         *reader
	left       int64 // in the body (length) or in the current chunk
	chunked    bool
	inChunk    bool
	eof        bool
	closed     bool
	limit, n   int64
	maxTrailer int
	err        error
}

func (b *h1Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, io.ErrClosedPipe
	}
	if b.err != nil {
		return 0, b.err
	}
	if b.eof {
		return 0, io.EOF
	}
	n, err := b.read(p)
	if err != nil && err != io.EOF {
		b.err = err
	}
	return n, err
}

func (b *h1Body) read(p []byte) (int, error) {
	if b.chunked && !b.inChunk {
		if err := b.nextChunk(); err != nil {
			return 0, err
		}
		if b.eof {
			return 0, io.EOF
		}
	}
	if !b.chunked && b.left <= 0 {
		b.eof = true
		return 0, io.EOF
	}
	for len(b.rd.buffered()) == 0 {
		if err := b.rd.fill(); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
	}
	buf := b.rd.buffered()
	if int64(len(buf)) > b.left {
		buf = buf[:b.left]
	}
	n := copy(p, buf)
	b.rd.r += n
	b.left -= int64(n)
	b.n += int64(n)
	if b.limit > 0 && b.n > b.limit {
		return n, errBodyTooLarge
	}
	if b.chunked && b.left == 0 {
		line, err := b.rd.readLine(16)
		if err != nil {
			return n, err
		}
		if len(line) != 0 {
			return n, errBadChunked
		}
		b.inChunk = false
	}
	return n, nil
}

func (b *h1Body) nextChunk() error {
	line, err := b.rd.readLine(4096)
	if err != nil {
		return err
	}
	size, ok := parseChunkSize(line)
	if !ok {
		return errBadChunked
	}
	if size > 0 {
		b.left, b.inChunk = size, true
		return nil
	}
	total := 0
	for {
		line, err := b.rd.readLine(b.maxTrailer)
		if err != nil {
			return err
		}
		if len(line) == 0 {
			break
		}
		if total += len(line); total > b.maxTrailer {
			return errBadChunked
		}
	}
	b.eof = true
	return nil
}

func (b *h1Body) Close() error { return nil }

// finish stops further reads and reports whether the body was read to its
// end, so the client connection can carry another request.
func (b *h1Body) finish() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	return b.eof || (!b.chunked && b.left == 0 && b.err == nil)
}

func (s *server) h2ErrorLog() *log.Logger {
	return slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)
}
