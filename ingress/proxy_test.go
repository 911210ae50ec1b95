package ingress

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"knit.dev/knit/internal/testkit"
)

func oneRoute(host string, svc string) []*networkingv1.Ingress {
	return []*networkingv1.Ingress{newIngress("r", 0, rule(host, path("/", prefix, svc)))}
}

func TestForwardBasics(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	c := h.client()

	req, _ := http.NewRequest("GET", "http://A.com:8080/hello/world?x=1&y=%20", nil)
	req.Header.Set("X-Forwarded-For", "203.0.113.9")
	req.Header.Set("X-Forwarded-Proto", "spoofed")
	req.Header.Set("Connection", "X-Secret, keep-alive")
	req.Header.Set("X-Secret", "hop-by-hop")
	req.Header.Set("Keep-Alive", "timeout=5")
	req.Header.Set("Proxy-Authorization", "Basic Zm9vOmJhcg==")
	req.Header.Set("X-Custom", "kept")
	req.Header.Add("X-Multi", "1")
	req.Header.Add("X-Multi", "2")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("X-Backend") != "a" {
		t.Fatalf("status %d", resp.StatusCode)
	}
	e := decodeEcho(t, resp)
	checks := []struct{ what, got, want string }{
		{"path", e.Path, "/hello/world"},
		{"query", e.Query, "x=1&y=%20"},
		{"host", e.Host, "A.com:8080"},
		{"proto", e.Proto, "HTTP/1.1"},
		{"xff", e.Header.Get("X-Forwarded-For"), "203.0.113.9, 127.0.0.1"},
		{"xfp", e.Header.Get("X-Forwarded-Proto"), "http"},
		{"xfh", e.Header.Get("X-Forwarded-Host"), "A.com:8080"},
		{"custom", e.Header.Get("X-Custom"), "kept"},
		{"multi", strings.Join(e.Header.Values("X-Multi"), ","), "1,2"},
		{"listed in Connection", e.Header.Get("X-Secret"), ""},
		{"keep-alive", e.Header.Get("Keep-Alive"), ""},
		{"proxy-authorization", e.Header.Get("Proxy-Authorization"), ""},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %q, want %q", c.what, c.got, c.want)
		}
	}
	if id := e.Header.Get("X-Request-Id"); len(id) != 32 {
		t.Errorf("X-Request-Id %q", id)
	}
	// A client's X-Request-Id is kept.
	req, _ = http.NewRequest("GET", "http://a.com/", nil)
	req.Header.Set("X-Request-Id", "abc-123")
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if e := decodeEcho(t, resp); e.Header.Get("X-Request-Id") != "abc-123" {
		t.Errorf("request id %q", e.Header.Get("X-Request-Id"))
	}
	// POST with a body.
	resp, err = c.Post("http://a.com/submit", "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	if e := decodeEcho(t, resp); e.Body != "payload" || e.Method != "POST" {
		t.Errorf("POST echoed %+v", e)
	}
}

func TestKeepAliveReuse(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	c := h.client()
	for i := 0; i < 50; i++ {
		resp, err := c.Get("http://a.com/x")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if n := be.conns.Load(); n != 1 {
		t.Errorf("backend saw %d connections for 50 sequential requests, want 1", n)
	}
	if n := h.counter("knit_ingress_upstream_connections_opened_total"); n != 1 {
		t.Errorf("dials %v", n)
	}
	// Large, chunked and close-delimited bodies leave the connection reusable.
	for _, p := range []string{"/big", "/stream", "/x"} {
		resp, err := c.Get("http://a.com" + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch p {
		case "/big":
			if len(b) != 1000000 {
				t.Errorf("/big: %d bytes", len(b))
			}
		case "/stream":
			if len(b) != 15000 || resp.ContentLength != -1 {
				t.Errorf("/stream: %d bytes, length %d", len(b), resp.ContentLength)
			}
		}
	}
	if n := be.conns.Load(); n != 1 {
		t.Errorf("backend saw %d connections, want 1", n)
	}
}

// flakyListener accepts connections and closes them at once, like a pod
// that is shutting down.
func flakyListener(t *testing.T) (string, *atomic.Int32) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			// Read the request, then close without answering.
			go func() {
				buf := make([]byte, 4096)
				_ = c.SetReadDeadline(time.Now().Add(time.Second))
				_, _ = c.Read(buf)
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String(), &n
}

// refusedAddr is a loopback address where nothing listens.
func refusedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func TestRetryAndEjection(t *testing.T) {
	good := newBackend(t, "good")
	dead := refusedAddr(t)
	flaky, flakyHits := flakyListener(t)
	h := newHarness(t, Config{EjectAfter: 3, EjectFor: time.Hour},
		endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {good.hostPort(), dead, flaky}}))
	c := h.client()
	for i := 0; i < 40; i++ {
		resp, err := c.Get(fmt.Sprintf("http://a.com/get/%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 {
			t.Fatalf("GET %d: status %d", i, resp.StatusCode)
		}
		resp.Body.Close()
	}
	// A refused connection is safe to retry for any method: nothing was sent.
	for i := 0; i < 10; i++ {
		resp, err := c.Post("http://a.com/post", "text/plain", strings.NewReader("x"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if n := h.counter("knit_ingress_upstream_ejections_total"); n != 2 {
		t.Errorf("ejections %v, want 2 (dead and flaky)", n)
	}
	hits := flakyHits.Load()
	if hits > 3 {
		t.Errorf("flaky endpoint got %d connections, want <= 3 before ejection", hits)
	}
	// Everything ejected but the good one: no more retries needed.
	before := h.counter("knit_ingress_upstream_retries_total")
	for i := 0; i < 20; i++ {
		resp, err := c.Get("http://a.com/again")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if after := h.counter("knit_ingress_upstream_retries_total"); after != before {
		t.Errorf("retries went from %v to %v with the bad endpoints ejected", before, after)
	}
}

func TestNoRetryOfNonIdempotentAfterSend(t *testing.T) {
	flaky, hits := flakyListener(t)
	h := newHarness(t, Config{EjectAfter: 100}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {flaky}}))
	c := h.client()
	resp, err := c.Post("http://a.com/pay", "text/plain", strings.NewReader("once"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 502 {
		t.Errorf("status %d, want 502", resp.StatusCode)
	}
	if n := hits.Load(); n != 1 {
		t.Errorf("POST was sent %d times, want exactly once", n)
	}
	hits.Store(0)
	resp, err = c.Get("http://a.com/read")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if n := hits.Load(); n != 3 {
		t.Errorf("GET was tried %d times, want 3 (1 + 2 retries)", n)
	}
}

// TestStaleKeepAliveRetried: the backend closes idle connections; the next
// GET on the pooled connection must be retried transparently.
func TestStaleKeepAliveRetried(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	c := h.client()
	for i := 0; i < 10; i++ {
		var resp *http.Response
		var err error
		if i%2 == 0 {
			resp, err = c.Get("http://a.com/x")
		} else {
			// Not retryable: must never be sent on the dead connection.
			resp, err = c.Post("http://a.com/p", "text/plain", strings.NewReader("x"))
		}
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("round %d: %d", i, resp.StatusCode)
		}
		be.CloseClientConnections() // the pooled upstream connection dies
		time.Sleep(20 * time.Millisecond)
	}
}

func TestLocalAnswers(t *testing.T) {
	be := newBackend(t, "a")
	ings := []*networkingv1.Ingress{
		newIngress("r", 0, rule("a.com", path("/", prefix, "svc"), path("/empty", prefix, "noeps"), path("/gone", prefix, "missing"))),
	}
	in := endpointsInput(ings, map[string][]string{"svc": {be.hostPort()}})
	in.missing = map[string]bool{"missing": true}
	h := newHarness(t, Config{}, in)
	tests := []struct {
		host, path string
		code       int
		body       string
	}{
		{"unknown.com", "/", 404, "no Ingress rule"},
		{"a.com", "/empty", 503, "no ready endpoints for default/noeps:80"},
		{"a.com", "/gone", 503, "service default/missing not found"},
	}
	c := h.client()
	for _, tc := range tests {
		resp, err := c.Get("http://" + tc.host + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || !strings.Contains(string(b), tc.body) {
			t.Errorf("%s%s: %d %q", tc.host, tc.path, resp.StatusCode, b)
		}
	}
	if be.reqs.Load() != 0 {
		t.Errorf("backend got %d requests", be.reqs.Load())
	}
}

// TestMalformedRequests covers request smuggling vectors and other bad
// input: every one is answered locally and the backend sees nothing.
func TestMalformedRequests(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{MaxHeaderBytes: 4096, MaxHeaderCount: 20, MaxBodyBytes: 100},
		endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	tests := []struct {
		name string
		req  string
		code int
	}{
		{"CL and TE", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"TE and CL", "POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400},
		{"two TE", "POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"TE list", "POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501},
		{"TE lookalike", "POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501},
		{"TE in 1.0", "POST / HTTP/1.0\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"TE with space before colon", "POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400},
		{"CL differing twice", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400},
		{"CL list", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 1, 1\r\n\r\na", 400},
		{"CL sign", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: +1\r\n\r\na", 400},
		{"CL hex", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 0x1\r\n\r\na", 400},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: a.com\r\nX-A: b\r\n c\r\n\r\n", 400},
		{"bare CR in value", "GET / HTTP/1.1\r\nHost: a.com\r\nX-A: b\rc\r\n\r\n", 400},
		{"NUL in value", "GET / HTTP/1.1\r\nHost: a.com\r\nX-A: b\x00c\r\n\r\n", 400},
		{"no Host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"two Hosts", "GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n", 400},
		{"bad Host", "GET / HTTP/1.1\r\nHost: a.com/evil\r\n\r\n", 400},
		{"userinfo in target", "GET http://user@a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"space in target", "GET /a b HTTP/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"fragment", "GET /a#b HTTP/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"dot segment", "GET /public/../admin HTTP/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"encoded dot segment", "GET /public/%2e%2E/admin HTTP/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"asterisk", "OPTIONS * HTTP/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"CONNECT", "CONNECT a.com:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 405},
		{"HTTP/2.0 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505},
		{"HTTP/1.2", "GET / HTTP/1.2\r\nHost: a.com\r\n\r\n", 505},
		{"garbage", "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400},
		{"lowercase version", "GET / http/1.1\r\nHost: a.com\r\n\r\n", 400},
		{"too many headers", "GET / HTTP/1.1\r\nHost: a.com\r\n" + strings.Repeat("X-A: b\r\n", 21) + "\r\n", 431},
		{"head too large", "GET / HTTP/1.1\r\nHost: a.com\r\nX-Big: " + strings.Repeat("b", 5000) + "\r\n\r\n", 431},
		{"body too large", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 101\r\n\r\n", 413},
		{"chunked body too large", "POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + strings.Repeat("z", 101) + "\r\n0\r\n\r\n", 413},
	}
	for _, tc := range tests {
		before := be.reqs.Load()
		resp, body := h.raw(tc.req)
		if resp == nil {
			t.Errorf("%s: no response", tc.name)
			continue
		}
		// A chunked body is streamed, so its head has reached the backend
		// by the time the limit is crossed; the backend then sees the
		// connection close before the last chunk, never a whole request.
		if be.reqs.Load() != before && !strings.HasPrefix(tc.name, "chunked") {
			t.Errorf("%s reached the backend", tc.name)
		}
		if resp.StatusCode != tc.code {
			t.Errorf("%s: status %d (%q), want %d", tc.name, resp.StatusCode, body, tc.code)
		}
		if !resp.Close && tc.code != 413 {
			t.Errorf("%s: connection left open after a rejected request", tc.name)
		}
	}
}

// TestChunkedRequestSmuggling: a malformed chunked body must not leave a
// second request behind on the upstream connection.
func TestChunkedRequestSmuggling(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	bad := []string{
		// Chunk data longer than its size line says.
		"POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcGET /smuggled HTTP/1.1\r\nHost: a.com\r\n\r\n0\r\n\r\n",
		// Size with junk.
		"POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n",
		// Negative size.
		"POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
		// Overflowing size.
		"POST / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
	}
	for i, req := range bad {
		resp, _ := h.raw(req)
		if resp != nil && resp.StatusCode == 200 {
			t.Errorf("case %d: got 200", i)
		}
	}
	time.Sleep(50 * time.Millisecond)
	resp, err := h.client().Get("http://a.com/check")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	for _, p := range be.seen() {
		if p == "/smuggled" {
			t.Fatal("a request smuggled in a chunk reached the backend")
		}
	}
	// The good chunked case works, and trailers pass.
	r, body := h.raw("POST /c HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
	if r == nil || r.StatusCode != 200 || !strings.Contains(body, `"Body":"abcde"`) {
		t.Errorf("good chunked request: %v %q", r, body)
	}
}

func TestAbsoluteFormIsNotAnOpenProxy(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	// Absolute-form for a host with no rule: 404, nothing is contacted.
	resp, _ := h.raw("GET http://" + be.hostPort() + "/secret HTTP/1.1\r\nHost: a.com\r\n\r\n")
	if resp == nil || resp.StatusCode != 404 {
		t.Fatalf("absolute-form to an unknown authority: %v", resp)
	}
	resp, _ = h.raw("GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n")
	if resp == nil || resp.StatusCode != 404 {
		t.Fatalf("absolute-form proxy request: %v", resp)
	}
	if be.reqs.Load() != 0 {
		t.Fatal("backend was contacted")
	}
	// Absolute-form for a routed host: the authority wins over Host (RFC
	// 9112 section 3.2.2) and the backend gets origin-form.
	resp, body := h.raw("GET http://a.com/p?q=1 HTTP/1.1\r\nHost: other.com\r\n\r\n")
	if resp == nil || resp.StatusCode != 200 {
		t.Fatalf("absolute-form to a.com: %v", resp)
	}
	if !strings.Contains(body, `"Path":"/p"`) || !strings.Contains(body, `"Host":"a.com"`) || !strings.Contains(body, `"Query":"q=1"`) {
		t.Errorf("backend saw %s", body)
	}
}

func TestPipeliningAndHTTP10(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	c, err := net.Dial("tcp", h.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET /one HTTP/1.1\r\nHost: a.com\r\n\r\nGET /two HTTP/1.1\r\nHost: a.com\r\n\r\nHEAD /three HTTP/1.1\r\nHost: a.com\r\n\r\nGET /stream HTTP/1.0\r\nHost: a.com\r\n\r\n")
	br := bufio.NewReader(c)
	for _, want := range []string{"/one", "/two"} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if !strings.Contains(string(b), `"Path":"`+want+`"`) {
			t.Errorf("pipelined %s: got %s", want, b)
		}
	}
	resp, err := http.ReadResponse(br, &http.Request{Method: "HEAD"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.ContentLength <= 0 {
		t.Errorf("HEAD lost Content-Length: %d", resp.ContentLength)
	}
	// HTTP/1.0 client, chunked upstream: close-delimited, then closed.
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if len(b) != 15000 || len(resp.TransferEncoding) != 0 {
		t.Errorf("HTTP/1.0 stream: %d bytes, TE %v", len(b), resp.TransferEncoding)
	}
	// HTTP/1.0 keep-alive with a Content-Length response.
	r2, body := h.raw("GET /ka HTTP/1.0\r\nHost: a.com\r\nConnection: keep-alive\r\n\r\n")
	if r2 == nil || r2.Close || !strings.Contains(body, `"/ka"`) {
		t.Errorf("HTTP/1.0 keep-alive: %v", r2)
	}
}

func TestExpectContinue(t *testing.T) {
	be := newBackend(t, "a")
	h := newHarness(t, Config{}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}))
	c, err := net.Dial("tcp", h.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "PUT /up HTTP/1.1\r\nHost: a.com\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(c)
	line, _ := br.ReadString('\n')
	if !strings.HasPrefix(line, "HTTP/1.1 100") {
		t.Fatalf("want 100 Continue first, got %q", line)
	}
	br.ReadString('\n')
	io.WriteString(c, "hello")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e := decodeEcho(t, resp); e.Body != "hello" || e.Header.Get("Expect") != "" {
		t.Errorf("echo %+v", e)
	}
}

func TestRedirectToHTTPS(t *testing.T) {
	be := newBackend(t, "a")
	ing := newIngress("r", 0, rule("secure.com", path("/", prefix, "svc")))
	ing.Annotations = map[string]string{AnnotationSSLRedirect: "true"}
	plain := newIngress("p", 1, rule("plain.com", path("/", prefix, "svc")))
	h := newHarness(t, Config{}, endpointsInput([]*networkingv1.Ingress{ing, plain}, map[string][]string{"svc": {be.hostPort()}}))
	resp, err := h.client().Get("http://Secure.com:80/a/b?c=d")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := net.SplitHostPort(h.https)
	if want := "https://secure.com:" + port + "/a/b?c=d"; resp.StatusCode != 308 || resp.Header.Get("Location") != want {
		t.Errorf("redirect %d %q, want 308 %q", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	resp, err = h.client().Get("http://plain.com/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("plain host: %d", resp.StatusCode)
	}
	// Over TLS the same host is proxied (default certificate here).
	tc := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", h.https)
		},
	}}
	resp, err = tc.Get("https://secure.com/x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("https to a redirecting host: %d", resp.StatusCode)
	}
}

func TestTLSBySNIAndRenewal(t *testing.T) {
	ca := newTestCA(t)
	be := newBackend(t, "a")
	ing := newIngress("tls", 0, rule("a.com", path("/", prefix, "svc")), rule("x.b.com", path("/", prefix, "svc")))
	ing.Spec.TLS = []networkingv1.IngressTLS{
		{Hosts: []string{"a.com"}, SecretName: "a-cert"},
		{Hosts: []string{"*.b.com"}, SecretName: "b-cert"},
		{Hosts: []string{"missing.com"}, SecretName: "nope"},
	}
	in := endpointsInput([]*networkingv1.Ingress{ing}, map[string][]string{"svc": {be.hostPort()}})
	in.secrets = map[string]*corev1.Secret{"a-cert": ca.secret(t, "a-cert", "a.com"), "b-cert": ca.secret(t, "b-cert", "*.b.com")}
	h := newHarness(t, Config{}, in)
	res := h.rebuild()
	foundMissing := false
	for _, p := range res.problems {
		foundMissing = foundMissing || p.reason == reasonSecretNotFound
	}
	if !foundMissing {
		t.Errorf("missing secret not reported: %v", res.problems)
	}

	serialOf := func(name string) (string, error) {
		c, err := h.tlsDial(name, ca.pool)
		if err != nil {
			return "", err
		}
		defer c.Close()
		st := c.ConnectionState()
		if st.Version < tls.VersionTLS12 {
			t.Errorf("TLS version %x", st.Version)
		}
		return st.PeerCertificates[0].SerialNumber.String(), nil
	}
	s1, err := serialOf("a.com")
	if err != nil {
		t.Fatalf("a.com: %v", err)
	}
	if _, err := serialOf("x.b.com"); err != nil {
		t.Errorf("wildcard x.b.com: %v", err)
	}
	if _, err := serialOf("A.COM"); err != nil {
		t.Errorf("SNI case: %v", err)
	}
	if _, err := serialOf("y.x.b.com"); err == nil {
		t.Error("two labels under the wildcard verified")
	}
	if _, err := serialOf("missing.com"); err == nil {
		t.Error("host with a missing secret verified (want the self-signed default)")
	}
	// TLS 1.1 is refused.
	if c, err := tls.Dial("tcp", h.https, &tls.Config{ServerName: "a.com", RootCAs: ca.pool, MaxVersion: tls.VersionTLS11}); err == nil {
		c.Close()
		t.Error("TLS 1.1 handshake succeeded")
	}

	// Renewal: a new certificate in the same Secret is served by the next
	// handshake, with no restart.
	in.secrets["a-cert"] = ca.secret(t, "a-cert", "a.com")
	h.rebuild()
	s2, err := serialOf("a.com")
	if err != nil {
		t.Fatal(err)
	}
	if s1 == s2 {
		t.Errorf("still serving serial %s after renewal", s1)
	}

	// HTTPS request over HTTP/1.1 (fast path) and HTTP/2 (net/http).
	for _, h2 := range []bool{false, true} {
		tr := &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: ca.pool},
			ForceAttemptHTTP2: h2,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", h.https)
			},
		}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		resp, err := (&http.Client{Transport: tr}).Get("https://a.com/secure?q=1")
		if err != nil {
			t.Fatal(err)
		}
		wantProto := 1
		if h2 {
			wantProto = 2
		}
		if resp.ProtoMajor != wantProto {
			t.Errorf("client protocol %s, want HTTP/%d", resp.Proto, wantProto)
		}
		e := decodeEcho(t, resp)
		if e.Header.Get("X-Forwarded-Proto") != "https" || e.Path != "/secure" || e.Query != "q=1" || e.Host != "a.com" {
			t.Errorf("h2=%v: backend saw %+v", h2, e)
		}
		if !strings.HasSuffix(e.Header.Get("X-Forwarded-For"), "127.0.0.1") || len(e.Header.Get("X-Request-Id")) == 0 {
			t.Errorf("h2=%v: forwarded headers %v", h2, e.Header)
		}
		tr.CloseIdleConnections()
	}
}

func TestMetricsAndAccessLog(t *testing.T) {
	be := newBackend(t, "a")
	var logBuf testkit.SyncBuffer
	h := newHarnessLog(t, Config{AccessLog: true}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {be.hostPort()}}),
		slog.New(slog.NewTextHandler(&logBuf, nil)))
	c := h.client()
	for _, u := range []string{"http://a.com/x", "http://a.com/y", "http://nowhere.com/"} {
		resp, err := c.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body) // so the client keeps the connection
		resp.Body.Close()
	}
	// Metrics are recorded just after the response is flushed: poll.
	var got map[string]float64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		got = map[string]float64{}
		mfs, _ := h.reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() != "knit_ingress_requests_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				l := map[string]string{}
				for _, lp := range m.GetLabel() {
					l[lp.GetName()] = lp.GetValue()
				}
				got[l["host"]+"|"+l["status"]+"|"+l["backend"]] = m.GetCounter().GetValue()
			}
		}
		if l := logBuf.String(); got["a.com|200|default/svc:80"] == 2 && got["|404|"] == 1 &&
			strings.Contains(l, "path=/y") && strings.Contains(l, "status=404") {
			break
		}
	}
	if got["a.com|200|default/svc:80"] != 2 || got["|404|"] != 1 {
		t.Errorf("requests_total %v", got)
	}
	if h.counter("knit_ingress_active_connections") < 1 {
		t.Error("active connections gauge not counting")
	}
	out := logBuf.String()
	for _, want := range []string{"msg=access", "method=GET", "host=a.com", "path=/x", "status=200", "backend=default/svc:80", "endpoint=" + be.hostPort(), "status=404", "request_id="} {
		if !strings.Contains(out, want) {
			t.Errorf("access log lacks %q:\n%s", want, out)
		}
	}
}

// scriptedBackend answers every request with the same raw bytes and then
// closes the connection.
func scriptedBackend(t *testing.T, raw string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				if _, err := http.ReadRequest(br); err != nil {
					return
				}
				io.WriteString(c, raw)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

func TestUpstreamFraming(t *testing.T) {
	tests := []struct {
		name     string
		raw      string
		code     int
		body     string
		chunked  bool
		complete bool // the client can tell the body is complete
	}{
		{"close-delimited", "HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nuntil close", 200, "until close", true, true},
		{"CL and TE", "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 502, "", false, true},
		{"bad status line", "HTTP/1.1 2xx OK\r\n\r\n", 502, "", false, true},
		{"no reason", "HTTP/1.1 204\r\n\r\n", 204, "", false, true},
		{"interim then final", "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, "ok", false, true},
		{"truncated chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 200, "ab", true, false},
		{"truncated length", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", 200, "ab", false, false},
	}
	for _, tc := range tests {
		addr := scriptedBackend(t, tc.raw)
		h := newHarness(t, Config{EjectAfter: 1000}, endpointsInput(oneRoute("a.com", "svc"), map[string][]string{"svc": {addr}}))
		c, err := net.Dial("tcp", h.http)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: a.com\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			c.Close()
			continue
		}
		b, err := io.ReadAll(resp.Body)
		c.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("%s: status %d, want %d", tc.name, resp.StatusCode, tc.code)
			continue
		}
		if tc.code != 200 {
			continue
		}
		if (err == nil) != tc.complete {
			t.Errorf("%s: body error %v; a truncated upstream body must show as truncated", tc.name, err)
		}
		if string(b) != tc.body || (len(resp.TransferEncoding) > 0) != tc.chunked {
			t.Errorf("%s: body %q TE %v", tc.name, b, resp.TransferEncoding)
		}
	}
}
