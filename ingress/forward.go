package ingress

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The fast path: one goroutine per client connection reads a request head
// into its buffer, looks the route up in the current table, takes a pooled
// keep-alive connection to an endpoint, writes the rewritten head (and a
// small body) in one write, reads the response head, writes the rewritten
// head and the body to the client, and puts the endpoint connection back.
// No goroutine is started per request, heads are parsed in place and
// buffers come from pools, so a request allocates next to nothing.
// WebSocket and other Upgrades become a two-way byte tunnel; h2c backends
// go through net/http (slow.go).

// clientConn is one client connection on the HTTP/1.x path.
type clientConn struct {
	s        *server
	c        net.Conn
	rd       reader
	w        bufWriter
	wbp      *[]byte // pooled backing of w.buf
	https    bool
	remoteIP string

	req  reqHead
	resp respHead
	host []byte // normalized host of the current request

	idle   atomic.Bool
	tunnel atomic.Pointer[net.Conn] // upstream side of an Upgrade, for forced shutdown

	log accessInfo // filled only with AccessLog on
}

type accessInfo struct {
	method, host, path, reqID, endpoint string
}

// bufWriter collects small writes into one.
type bufWriter struct {
	c   net.Conn
	buf []byte
	err error
}

func (w *bufWriter) flush() error {
	if w.err != nil {
		return w.err
	}
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.c.Write(w.buf)
	w.buf = w.buf[:0]
	if err != nil {
		w.err = err
	}
	return err
}

func (w *bufWriter) write(p []byte) error {
	if w.err != nil {
		return w.err
	}
	if len(w.buf)+len(p) <= cap(w.buf) {
		w.buf = append(w.buf, p...)
		return nil
	}
	if err := w.flush(); err != nil {
		return err
	}
	if len(p) >= cap(w.buf)/2 {
		_, err := w.c.Write(p)
		if err != nil {
			w.err = err
		}
		return err
	}
	w.buf = append(w.buf, p...)
	return nil
}

func (w *bufWriter) writeString(s string) error {
	if len(w.buf)+len(s) <= cap(w.buf) {
		w.buf = append(w.buf, s...)
		return w.err
	}
	return w.write([]byte(s))
}

const (
	clientBufSize = 4 << 10
	writeBufSize  = 16 << 10
)

var (
	clientBufPool = sync.Pool{New: func() any { return make([]byte, clientBufSize) }}
	writeBufPool  = sync.Pool{New: func() any { b := make([]byte, 0, writeBufSize); return &b }}
)

func (s *server) newClientConn(c net.Conn, https bool) *clientConn {
	cc := &clientConn{s: s, c: c, https: https}
	cc.rd = reader{c: c, buf: clientBufPool.Get().([]byte)}
	cc.req.headers = make([]header, 0, 32)
	cc.resp.headers = make([]header, 0, 32)
	cc.host = make([]byte, 0, 64)
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		cc.remoteIP = a.IP.String()
	} else if c.RemoteAddr() != nil {
		cc.remoteIP = c.RemoteAddr().String()
	}
	return cc
}

func (cc *clientConn) release() {
	if len(cc.rd.buf) == clientBufSize {
		clientBufPool.Put(cc.rd.buf) //nolint:staticcheck
	}
	cc.rd.buf = nil
	cc.putWriteBuf()
}

func (cc *clientConn) getWriteBuf() {
	if cc.wbp == nil {
		cc.wbp = writeBufPool.Get().(*[]byte)
		cc.w.buf = (*cc.wbp)[:0]
	}
}

func (cc *clientConn) putWriteBuf() {
	if cc.wbp == nil {
		return
	}
	if cap(cc.w.buf) == writeBufSize {
		*cc.wbp = cc.w.buf[:0]
		writeBufPool.Put(cc.wbp)
	}
	cc.wbp, cc.w.buf = nil, nil
}

// serve runs the connection until the client goes away, a request asks to
// close, an error makes reuse unsafe, or the server shuts down.
func (cc *clientConn) serve() {
	s := cc.s
	set := s.set
	for {
		if len(cc.rd.buffered()) == 0 {
			// Between requests: give the write buffer back and wait for the
			// next request at most idleTimeout.
			cc.putWriteBuf()
			_ = cc.c.SetReadDeadline(deadline(set.idleTimeout))
			cc.idle.Store(true)
			if s.closing.Load() {
				return
			}
			err := cc.rd.fill()
			cc.idle.Store(false)
			if err != nil {
				return
			}
		}
		cc.getWriteBuf()
		var head []byte
		if n := findHeadEnd(cc.rd.buffered(), 0); n >= 0 && n <= set.maxHeaderBytes {
			head = cc.rd.buffered()[:n]
			cc.rd.r += n
		} else {
			// The head came in pieces: from now on it must complete within
			// readHeaderTimeout (slowloris).
			_ = cc.c.SetReadDeadline(deadline(set.readHeaderTimeout))
			var err error
			head, err = cc.rd.readHead(set.maxHeaderBytes)
			if err != nil {
				if err == errHeadTooLarge {
					cc.reject(errHeadTooLarge)
				}
				return
			}
		}
		start := time.Now()
		if herr := parseRequestHead(head, &cc.req, set.limits); herr != nil {
			cc.reject(herr)
			return
		}
		if !cc.handle(start) || s.closing.Load() {
			return
		}
	}
}

// reject answers a request that could not be parsed, and the connection is
// closed after it: its framing cannot be trusted.
func (cc *clientConn) reject(herr *httpError) {
	cc.getWriteBuf()
	cc.w.c = cc.c
	cc.w.err = nil
	cc.writeLocal(herr.code, herr.msg, false, nil)
	_ = cc.w.flush()
	cc.s.m.noRoute.inc(herr.code)
}

// handle routes and answers one request; it reports whether the
// connection may carry another.
func (cc *clientConn) handle(start time.Time) bool {
	s := cc.s
	req := &cc.req
	cc.host = normalizeHost(cc.host, req.host)
	if s.set.accessLog {
		cc.log = accessInfo{method: string(req.method), host: string(req.host), path: string(req.path)}
	}
	t := s.table.Load()
	var rt *route
	if t != nil {
		rt = t.lookup(cc.host, req.path)
	}
	cc.w.c, cc.w.err = cc.c, nil
	switch {
	case t == nil:
		return cc.local(nil, 503, "ingress is starting", start)
	case rt == nil:
		return cc.local(nil, 404, "no Ingress rule matches this host and path", start)
	case rt.sslRedirect && !cc.https:
		return cc.redirect(rt, start)
	case rt.backend.kind == kindError:
		return cc.local(rt, rt.backend.status, rt.backend.msg, start)
	case s.set.maxBodyBytes > 0 && req.contentLength > s.set.maxBodyBytes:
		return cc.local(rt, 413, errBodyTooLarge.msg, start)
	case rt.backend.h2c:
		return cc.forwardSlow(rt, start)
	}
	return cc.forward(rt, start)
}

// keepAlive reports whether the client connection may be reused after
// this request, as far as the request is concerned.
func (cc *clientConn) keepAlive() bool {
	req := &cc.req
	if req.connClose || cc.s.closing.Load() {
		return false
	}
	return req.http11 || req.connKeepAlive
}

// local answers a request without an upstream. A request body that was
// not read makes the connection unusable, so it is closed then.
func (cc *clientConn) local(rt *route, code int, msg string, start time.Time) bool {
	return cc.respondLocal(rt, code, msg, start, cc.keepAlive() && !cc.req.hasBody())
}

func (cc *clientConn) respondLocal(rt *route, code int, msg string, start time.Time, keep bool) bool {
	cc.writeLocal(code, msg, keep, nil)
	err := cc.w.flush()
	cc.done(rt, code, start, int64(len(msg)+1))
	return keep && err == nil
}

// writeLocal appends a complete plain-text response.
func (cc *clientConn) writeLocal(code int, msg string, keep bool, location []byte) {
	b := cc.w.buf[:0]
	b = append(b, "HTTP/1.1 "...)
	b = append(b, statusText(code)...)
	b = append(b, ' ')
	b = append(b, reasonPhrase(code)...)
	b = append(b, "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(msg)+1), 10)
	if location != nil {
		b = append(b, "\r\nLocation: "...)
		b = append(b, location...)
	}
	if !keep {
		b = append(b, "\r\nConnection: close"...)
	} else if !cc.req.http11 {
		b = append(b, "\r\nConnection: keep-alive"...)
	}
	b = append(b, "\r\n\r\n"...)
	b = append(b, msg...)
	b = append(b, '\n')
	cc.w.buf = b
}

// redirect answers 308 to the same URL over https.
func (cc *clientConn) redirect(rt *route, start time.Time) bool {
	req := &cc.req
	var loc [256]byte
	l := append(loc[:0], "https://"...)
	l = append(l, cc.host...)
	if p := cc.s.set.httpsPort; p != "" {
		l = append(l, ':')
		l = append(l, p...)
	}
	l = append(l, req.path...)
	l = append(l, req.query...)
	keep := cc.keepAlive() && !req.hasBody()
	const msg = "this host is served over https"
	cc.writeLocal(308, msg, keep, l)
	err := cc.w.flush()
	cc.done(rt, 308, start, int64(len(msg)+1))
	return keep && err == nil
}

// done records a finished request in metrics and, when enabled, the
// access log.
func (cc *clientConn) done(rt *route, code int, start time.Time, bytes int64) {
	s := cc.s
	d := time.Since(start)
	if rt != nil && rt.metrics != nil {
		rt.metrics.inc(code)
	} else {
		s.m.noRoute.inc(code)
	}
	s.m.duration.Observe(d.Seconds())
	if s.set.accessLog {
		cc.accessLog(rt, code, d, bytes)
	}
}

func (cc *clientConn) accessLog(rt *route, code int, d time.Duration, bytes int64) {
	attrs := []slog.Attr{
		slog.String("method", cc.log.method),
		slog.String("host", cc.log.host),
		slog.String("path", cc.log.path),
		slog.Int("status", code),
		slog.Duration("duration", d),
		slog.Int64("bytes", bytes),
		slog.String("client", cc.remoteIP),
		slog.String("request_id", cc.log.reqID),
	}
	if rt != nil {
		attrs = append(attrs, slog.String("ingress", rt.ingress), slog.String("backend", rt.backend.name))
	}
	if cc.log.endpoint != "" {
		attrs = append(attrs, slog.String("endpoint", cc.log.endpoint))
	}
	cc.s.log.LogAttrs(context.Background(), slog.LevelInfo, "access", attrs...)
}

// newRequestID makes a random 128-bit id in hex.
func newRequestID(dst *[32]byte) []byte {
	const hex = "0123456789abcdef"
	a, b := rand.Uint64(), rand.Uint64()
	for i := 0; i < 16; i++ {
		dst[i] = hex[(a>>(4*i))&0xf]
		dst[16+i] = hex[(b>>(4*i))&0xf]
	}
	return dst[:]
}

// appendRequestHead writes the request head for the upstream: origin-form
// target, the client's Host, the end-to-end fields, X-Forwarded-* and
// X-Request-Id, and framing fields of our own. Hop-by-hop fields (RFC 9110
// section 7.6.1), including those the client's Connection field names,
// stay behind.
func (cc *clientConn) appendRequestHead(b, reqID []byte, upgrade bool) []byte {
	req := &cc.req
	b = append(b, req.method...)
	b = append(b, ' ')
	b = append(b, req.path...)
	b = append(b, req.query...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, req.host...)
	b = append(b, "\r\n"...)
	for i := range req.headers {
		h := &req.headers[i]
		if h.kind != hOther {
			continue
		}
		if len(req.connTokens) > 0 && listedInConnection(req.connTokens, h.name) {
			continue
		}
		b = append(b, h.name...)
		b = append(b, ": "...)
		b = append(b, h.value...)
		b = append(b, "\r\n"...)
	}
	b = append(b, "X-Forwarded-For: "...)
	for i := range req.headers {
		if h := &req.headers[i]; h.kind == hXForwardedFor && len(h.value) > 0 {
			b = append(b, h.value...)
			b = append(b, ", "...)
		}
	}
	b = append(b, cc.remoteIP...)
	b = append(b, "\r\nX-Forwarded-Host: "...)
	b = append(b, req.host...)
	if cc.https {
		b = append(b, "\r\nX-Forwarded-Proto: https\r\nX-Request-Id: "...)
	} else {
		b = append(b, "\r\nX-Forwarded-Proto: http\r\nX-Request-Id: "...)
	}
	b = append(b, reqID...)
	b = append(b, "\r\n"...)
	if upgrade {
		b = append(b, "Connection: Upgrade\r\nUpgrade: "...)
		b = append(b, req.upgrade...)
		b = append(b, "\r\n"...)
	}
	if req.chunked {
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	} else if req.contentLength >= 0 {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, req.contentLength, 10)
		b = append(b, "\r\n"...)
	}
	return append(b, "\r\n"...)
}

// bodyMode is how a response body is carried to the client.
type bodyMode uint8

const (
	bodyNone     bodyMode = iota
	bodyLength            // Content-Length
	bodyChunked           // chunked both sides, re-framed chunk by chunk
	bodyUnchunk           // chunked upstream, close-delimited to an HTTP/1.0 client
	bodyEOFChunk          // close-delimited upstream, chunked to the client
	bodyEOF               // close-delimited both sides
)

// appendResponseHead writes the response head for the client.
func appendResponseHead(b []byte, resp *respHead, mode bodyMode, keep, client11 bool) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = append(b, statusText(resp.status)...)
	b = append(b, ' ')
	if len(resp.reason) > 0 {
		b = append(b, resp.reason...)
	} else {
		b = append(b, reasonPhrase(resp.status)...)
	}
	b = append(b, "\r\n"...)
	upgrade := resp.status == 101
	for i := range resp.headers {
		h := &resp.headers[i]
		switch h.kind {
		case hConnection, hKeepAlive, hProxyConnection, hTransferEncoding, hTE, hProxyAuthenticate:
			continue
		case hContentLength:
			if mode == bodyLength || (mode == bodyNone && resp.status != 204) {
				break
			}
			continue
		case hUpgrade:
			if !upgrade {
				continue
			}
		case hTrailer:
			if mode != bodyChunked {
				continue
			}
		}
		if len(resp.connTokens) > 0 && listedInConnection(resp.connTokens, h.name) {
			continue
		}
		b = append(b, h.name...)
		b = append(b, ": "...)
		b = append(b, h.value...)
		b = append(b, "\r\n"...)
	}
	switch {
	case upgrade:
		b = append(b, "Connection: Upgrade\r\n"...)
	case mode == bodyChunked || mode == bodyEOFChunk:
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	}
	if !upgrade {
		if !keep {
			b = append(b, "Connection: close\r\n"...)
		} else if !client11 {
			b = append(b, "Connection: keep-alive\r\n"...)
		}
	}
	return append(b, "\r\n"...)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// forward proxies one request to an endpoint of rt's Service.
func (cc *clientConn) forward(rt *route, start time.Time) bool {
	s, req, be := cc.s, &cc.req, rt.backend
	set := s.set
	isHead := string(req.method) == "HEAD"
	client11 := req.http11
	keep := cc.keepAlive()
	idem := isIdempotent(req.method)
	bodyBuffered := req.contentLength > 0 && int64(len(cc.rd.buffered())) >= req.contentLength
	replayable := !req.hasBody() || bodyBuffered
	upgrade := len(req.upgrade) > 0 && !eqFold(req.upgrade, "h2c")

	var idBuf [32]byte
	reqID := req.requestID
	if len(reqID) == 0 || len(reqID) > 128 {
		reqID = newRequestID(&idBuf)
	}
	if set.accessLog {
		cc.log.reqID = string(reqID)
	}
	if req.expect100 && req.http11 && req.hasBody() && !bodyBuffered {
		// Answer the expectation ourselves and drop it: the body is then
		// streamed to the endpoint after the head, never waiting on it.
		if _, err := io.WriteString(cc.c, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return false
		}
	}

	// The request head (and a body already read) is kept in the write
	// buffer until a response head arrives, so it can be sent again.
	cc.w.buf = cc.appendRequestHead(cc.w.buf[:0], reqID, upgrade)
	if bodyBuffered {
		cc.w.buf = append(cc.w.buf, cc.rd.buffered()[:req.contentLength]...)
	}

	var tried [maxTries]*upstream
	ntried := 0
	var uc *upConn
	for attempt := 0; ; attempt++ {
		up := be.pick(tried[:ntried])
		if up == nil {
			return cc.localAfterBody(rt, 503, "no ready endpoints for "+be.name, start, bodyBuffered)
		}
		if ntried < len(tried) {
			tried[ntried] = up
			ntried++
		}
		reused := true
		uc = up.getIdle()
		for uc != nil && !(idem && replayable) && !uc.alive() {
			// A request that cannot be sent twice must not go out on a
			// connection the upstream already closed.
			uc.close()
			uc = up.getIdle()
		}
		if uc == nil {
			reused = false
			var err error
			if uc, err = up.dial(); err != nil {
				up.failure()
				if attempt < set.retries && replayable {
					s.m.retries.Inc()
					continue
				}
				code, msg := 502, "cannot connect to an endpoint of "+be.name
				if isTimeout(err) {
					code, msg = 504, "timed out connecting to an endpoint of "+be.name
				}
				return cc.localAfterBody(rt, code, msg, start, bodyBuffered)
			}
		}
		up.inflight.Add(1)
		_, err := uc.c.Write(cc.w.buf)
		streamed := false
		if err == nil && req.hasBody() && !bodyBuffered {
			streamed = true
			cerr, uerr := cc.streamRequestBody(uc)
			if cerr != nil {
				up.inflight.Add(-1)
				uc.close()
				if cerr == errBodyTooLarge {
					cc.w.c, cc.w.err = cc.c, nil
					keep = false
					cc.writeLocal(413, errBodyTooLarge.msg, false, nil)
					_ = cc.w.flush()
					cc.done(rt, 413, start, 0)
				}
				return false
			}
			err = uerr
		}
		if err == nil {
			_ = uc.c.SetReadDeadline(deadline(set.upstreamReadTimeout))
			err = cc.readResponseHead(uc)
		}
		if err == nil {
			break
		}
		// The exchange failed before a response head arrived.
		got := len(uc.rd.buffered()) > 0
		up.inflight.Add(-1)
		uc.close()
		if isTimeout(err) {
			up.failure()
			return cc.localAfterBody(rt, 504, "endpoint of "+be.name+" did not answer in time", start, bodyBuffered && !streamed)
		}
		if !reused {
			up.failure()
		}
		if !got && !streamed && idem && replayable && attempt < set.retries {
			// Nothing came back: a stale keep-alive connection, or an
			// endpoint that just went away. Safe to send again.
			s.m.retries.Inc()
			continue
		}
		code, msg := 502, "endpoint of "+be.name+" closed the connection"
		if err == errUpstreamHead || err == errUpstreamFrame {
			msg = "invalid response from an endpoint of " + be.name
		}
		return cc.localAfterBody(rt, code, msg, start, false)
	}
	up := uc.up
	up.success()
	if bodyBuffered {
		cc.rd.r += int(req.contentLength)
	}
	if set.accessLog {
		cc.log.endpoint = up.addr
	}
	resp := &cc.resp
	status := resp.status

	upKeep := (resp.http11 && !resp.connClose) || (!resp.http11 && resp.connKeepAlive)
	var mode bodyMode
	switch {
	case status == 101:
		if !upgrade {
			up.inflight.Add(-1)
			uc.close()
			return cc.localAfterBody(rt, 502, "unexpected 101 from an endpoint of "+be.name, start, false)
		}
		cc.w.c, cc.w.err = cc.c, nil
		cc.w.buf = appendResponseHead(cc.w.buf[:0], resp, bodyNone, true, client11)
		cc.done(rt, 101, start, 0)
		cc.runTunnel(uc)
		up.inflight.Add(-1)
		return false
	case isHead || status == 204 || status == 304:
		mode = bodyNone
	case resp.chunked && client11:
		mode = bodyChunked
	case resp.chunked:
		mode, keep = bodyUnchunk, false
	case resp.contentLength >= 0:
		mode = bodyLength
	case client11:
		mode, upKeep = bodyEOFChunk, false
	default:
		mode, upKeep, keep = bodyEOF, false, false
	}

	// Response: head and whatever body is already buffered go out in one
	// write in the common case.
	cc.w.c, cc.w.err = cc.c, nil
	_ = cc.c.SetWriteDeadline(deadline(set.writeTimeout))
	cc.w.buf = appendResponseHead(cc.w.buf[:0], resp, mode, keep, client11)
	uc.rd.peer = &cc.w
	uc.rd.refresh = set.upstreamReadTimeout
	var n int64
	var uerr, cerr error
	switch mode {
	case bodyLength:
		n = resp.contentLength
		uerr, cerr = copyLength(&uc.rd, &cc.w, resp.contentLength)
	case bodyChunked, bodyUnchunk:
		n, uerr, cerr = copyChunked(&uc.rd, &cc.w, mode == bodyChunked, 0, set.maxHeaderBytes)
	case bodyEOFChunk, bodyEOF:
		n, uerr, cerr = copyUntilEOF(&uc.rd, &cc.w, mode == bodyEOFChunk)
	}
	uc.rd.peer, uc.rd.refresh = nil, 0
	if cerr == nil {
		cerr = cc.w.flush()
	}
	up.inflight.Add(-1)
	if uerr == nil && cerr == nil && upKeep && len(uc.rd.buffered()) == 0 {
		up.put(uc)
	} else {
		uc.close()
	}
	cc.done(rt, status, start, n)
	return keep && uerr == nil && cerr == nil
}

// localAfterBody answers locally once forwarding failed. consumeBody says
// whether a fully buffered body can be skipped so the connection stays
// usable.
func (cc *clientConn) localAfterBody(rt *route, code int, msg string, start time.Time, consumeBody bool) bool {
	cc.w.c, cc.w.err = cc.c, nil
	if consumeBody {
		cc.rd.r += int(cc.req.contentLength)
		return cc.respondLocal(rt, code, msg, start, cc.keepAlive())
	}
	return cc.local(rt, code, msg, start)
}

// readResponseHead reads the next final response head from uc, skipping
// interim 1xx responses other than 101.
func (cc *clientConn) readResponseHead(uc *upConn) error {
	for {
		head, err := uc.rd.readHead(maxResponseHead)
		if err != nil {
			if err == errHeadTooLarge || err == errBufferFull {
				return errUpstreamHead
			}
			return err
		}
		if err := parseResponseHead(head, &cc.resp, maxResponseHeaders); err != nil {
			return err
		}
		if s := cc.resp.status; s >= 200 || s == 101 {
			return nil
		}
	}
}

const (
	maxResponseHead    = 64 << 10
	maxResponseHeaders = 256
)

// streamRequestBody sends a request body that is not (all) buffered yet.
// cerr is a client-side failure (including a body over the limit), uerr
// one writing to the upstream.
func (cc *clientConn) streamRequestBody(uc *upConn) (cerr, uerr error) {
	req := &cc.req
	set := cc.s.set
	cc.w.c, cc.w.err = uc.c, nil
	cc.w.buf = cc.w.buf[:0]
	cc.rd.peer = &cc.w
	cc.rd.refresh = set.idleTimeout
	defer func() { cc.rd.peer, cc.rd.refresh = nil, 0 }()
	_ = uc.c.SetWriteDeadline(deadline(set.upstreamReadTimeout))
	defer func() { _ = uc.c.SetWriteDeadline(time.Time{}) }()
	if req.chunked {
		_, cerr, uerr = copyChunked(&cc.rd, &cc.w, true, set.maxBodyBytes, set.maxHeaderBytes)
	} else {
		cerr, uerr = copyLength(&cc.rd, &cc.w, req.contentLength)
	}
	if cerr == nil && uerr == nil {
		uerr = cc.w.flush()
	}
	return cerr, uerr
}

// errPeerWrite is what a reader's fill returns when flushing its peer
// writer failed; the writer holds the real error.
var errPeerWrite = errors.New("write to peer failed")

// copyLength copies n body bytes from src to dst. serr is a failure of the
// source (including a premature end), derr one of the destination.
func copyLength(src *reader, dst *bufWriter, n int64) (serr, derr error) {
	for n > 0 {
		b := src.buffered()
		if len(b) == 0 {
			if err := src.fill(); err != nil {
				return sideErr(err, dst)
			}
			continue
		}
		if int64(len(b)) > n {
			b = b[:n]
		}
		if err := dst.write(b); err != nil {
			return nil, err
		}
		src.r += len(b)
		n -= int64(len(b))
	}
	return nil, nil
}

func sideErr(err error, dst *bufWriter) (serr, derr error) {
	switch err {
	case errPeerWrite:
		return nil, dst.err
	case io.EOF:
		return io.ErrUnexpectedEOF, nil
	}
	return err, nil
}

// copyChunked copies a chunked body, re-framing each chunk (rechunk) or
// writing only the data (to an HTTP/1.0 client). Trailer fields are
// checked and forwarded when re-framing. limit > 0 bounds the body size
// (serr is then errBodyTooLarge).
func copyChunked(src *reader, dst *bufWriter, rechunk bool, limit int64, maxTrailer int) (n int64, serr, derr error) {
	var hexBuf [20]byte
	for {
		line, err := src.readLine(4096)
		if err != nil {
			serr, derr = sideErr(err, dst)
			return n, serr, derr
		}
		size, ok := parseChunkSize(line)
		if !ok {
			return n, errBadChunked, nil
		}
		if size == 0 {
			break
		}
		n += size
		if limit > 0 && n > limit {
			return n, errBodyTooLarge, nil
		}
		if rechunk {
			h := strconv.AppendInt(hexBuf[:0], size, 16)
			h = append(h, '\r', '\n')
			if err := dst.write(h); err != nil {
				return n, nil, err
			}
		}
		if serr, derr = copyLength(src, dst, size); serr != nil || derr != nil {
			return n, serr, derr
		}
		line, err = src.readLine(16)
		if err != nil {
			serr, derr = sideErr(err, dst)
			return n, serr, derr
		}
		if len(line) != 0 {
			return n, errBadChunked, nil
		}
		if rechunk {
			if err := dst.writeString("\r\n"); err != nil {
				return n, nil, err
			}
		}
	}
	if rechunk {
		if err := dst.writeString("0\r\n"); err != nil {
			return n, nil, err
		}
	}
	total := 0
	for {
		line, err := src.readLine(maxTrailer)
		if err != nil {
			serr, derr = sideErr(err, dst)
			return n, serr, derr
		}
		if len(line) == 0 {
			break
		}
		total += len(line)
		if total > maxTrailer {
			return n, errBadChunked, nil
		}
		if _, _, herr := parseField(line); herr != nil {
			return n, errBadChunked, nil
		}
		if rechunk {
			if err := dst.write(line); err != nil {
				return n, nil, err
			}
			if err := dst.writeString("\r\n"); err != nil {
				return n, nil, err
			}
		}
	}
	if rechunk {
		if err := dst.writeString("\r\n"); err != nil {
			return n, nil, err
		}
	}
	return n, nil, nil
}

// copyUntilEOF copies a body that ends when the upstream closes.
func copyUntilEOF(src *reader, dst *bufWriter, rechunk bool) (n int64, serr, derr error) {
	var hexBuf [20]byte
	for {
		b := src.buffered()
		if len(b) == 0 {
			err := src.fill()
			if err == io.EOF {
				break
			}
			if err != nil {
				serr, derr = sideErr(err, dst)
				return n, serr, derr
			}
			continue
		}
		if rechunk {
			h := strconv.AppendInt(hexBuf[:0], int64(len(b)), 16)
			h = append(h, '\r', '\n')
			if err := dst.write(h); err != nil {
				return n, nil, err
			}
		}
		if err := dst.write(b); err != nil {
			return n, nil, err
		}
		if rechunk {
			if err := dst.writeString("\r\n"); err != nil {
				return n, nil, err
			}
		}
		src.r += len(b)
		n += int64(len(b))
	}
	if rechunk {
		if err := dst.writeString("0\r\n\r\n"); err != nil {
			return n, nil, err
		}
	}
	return n, nil, nil
}

// runTunnel carries bytes both ways after a 101 until both sides are
// done; the 101 head is in cc.w.
func (cc *clientConn) runTunnel(uc *upConn) {
	defer uc.close()
	// Bytes the upstream sent after its 101 go right behind the head.
	if err := cc.w.write(uc.rd.buffered()); err != nil {
		return
	}
	uc.rd.r = uc.rd.w
	if err := cc.w.flush(); err != nil {
		return
	}
	_ = cc.c.SetDeadline(time.Time{})
	_ = uc.c.SetDeadline(time.Time{})
	cc.tunnel.Store(&uc.c)
	defer cc.tunnel.Store(nil)
	if cc.s.closing.Load() {
		return
	}
	// Bytes the client sent after its request are the tunnel's first.
	if b := cc.rd.buffered(); len(b) > 0 {
		if _, err := uc.c.Write(b); err != nil {
			return
		}
		cc.rd.r = cc.rd.w
	}
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(cc.c, uc.c)
		closeWrite(cc.c)
		// The upstream is done: give the client a moment to finish too.
		_ = cc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		close(done)
	}()
	_, _ = io.Copy(uc.c, cc.c)
	closeWrite(uc.c)
	_ = uc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	<-done
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

// reasonPhrase is the standard reason phrase for the codes knit itself
// sends, and for upstream responses that omit theirs.
func reasonPhrase(code int) string {
	switch code {
	case 100:
		return "Continue"
	case 101:
		return "Switching Protocols"
	case 200:
		return "OK"
	case 204:
		return "No Content"
	case 301:
		return "Moved Permanently"
	case 302:
		return "Found"
	case 304:
		return "Not Modified"
	case 308:
		return "Permanent Redirect"
	case 400:
		return "Bad Request"
	case 404:
		return "Not Found"
	case 405:
		return "Method Not Allowed"
	case 408:
		return "Request Timeout"
	case 413:
		return "Content Too Large"
	case 431:
		return "Request Header Fields Too Large"
	case 500:
		return "Internal Server Error"
	case 501:
		return "Not Implemented"
	case 502:
		return "Bad Gateway"
	case 503:
		return "Service Unavailable"
	case 504:
		return "Gateway Timeout"
	case 505:
		return "HTTP Version Not Supported"
	}
	return "Status"
}
