package ingress

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// wsBackend answers an Upgrade: websocket request with 101 and then echoes
// every byte back, upper-cased, so the test sees both directions.
func wsBackend(t *testing.T) string {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || !strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") {
			http.Error(w, "want upgrade", 400)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: test\r\n\r\nhello-from-server\n")
		buf := make([]byte, 1024)
		for {
			n, err := brw.Read(buf)
			if n > 0 {
				c.Write([]byte(strings.ToUpper(string(buf[:n]))))
			}
			if err != nil {
				return
			}
		}
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestWebSocketUpgrade(t *testing.T) {
	addr := wsBackend(t)
	h := newHarness(t, Config{}, endpointsInput(oneRoute("ws.com", "svc"), map[string][]string{"svc": {addr}}))
	for _, viaTLS := range []bool{false, true} {
		var c net.Conn
		var err error
		if viaTLS {
			c, err = tls.Dial("tcp", h.https, &tls.Config{ServerName: "ws.com", InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
		} else {
			c, err = net.Dial("tcp", h.http)
		}
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		// The first frame rides in the same packet as the request.
		io.WriteString(c, "GET /chat HTTP/1.1\r\nHost: ws.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\nearly-")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 101 || resp.Header.Get("Upgrade") != "websocket" || resp.Header.Get("Sec-Websocket-Accept") != "test" {
			t.Fatalf("tls=%v: handshake %d %v", viaTLS, resp.StatusCode, resp.Header)
		}
		line, _ := br.ReadString('\n')
		if line != "hello-from-server\n" {
			t.Errorf("server's first bytes: %q", line)
		}
		io.WriteString(c, "ping\n")
		got := ""
		for !strings.HasSuffix(got, "\n") {
			b := make([]byte, 64)
			n, err := br.Read(b)
			if err != nil {
				t.Fatalf("tls=%v: read echo: %v (so far %q)", viaTLS, err, got)
			}
			got += string(b[:n])
		}
		if got != "EARLY-PING\n" {
			t.Errorf("tls=%v: echo %q", viaTLS, got)
		}
		c.Close()
	}
	// A non-upgrade request to the same backend still works.
	resp, _ := h.raw("GET / HTTP/1.1\r\nHost: ws.com\r\n\r\n")
	if resp == nil || resp.StatusCode != 400 {
		t.Errorf("plain request: %v", resp)
	}
}

// h2cBackend speaks only HTTP/2 without TLS, like a gRPC server, and sends
// a trailer.
func h2cBackend(t *testing.T) string {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "Grpc-Status")
		w.Header().Set("Content-Type", "application/grpc")
		w.WriteHeader(200)
		io.WriteString(w, r.Proto+" "+r.Method+" "+r.URL.RequestURI()+" "+r.Host+" body="+string(body)+" xfp="+r.Header.Get("X-Forwarded-Proto"))
		w.Header().Set("Grpc-Status", "0")
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestH2CBackend(t *testing.T) {
	addr := h2cBackend(t)
	host, port, _ := net.SplitHostPort(addr)
	in := endpointsInput(oneRoute("grpc.com", "grpc"), map[string][]string{"grpc": {addr}})
	pn := int32(0)
	for _, c := range port {
		pn = pn*10 + int32(c-'0')
	}
	_ = host
	in.svcs = map[string]*corev1.Service{"grpc": {
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "grpc"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, AppProtocol: ptr("kubernetes.io/h2c")},
		}},
	}}
	h := newHarness(t, Config{}, in)

	// HTTP/2 over TLS from the client, h2c to the backend, trailers intact.
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", h.https)
		},
	}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("POST", "https://grpc.com/pkg.Svc/Method", strings.NewReader("msg"))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("TE", "trailers")
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 || string(body) != "HTTP/2.0 POST /pkg.Svc/Method grpc.com body=msg xfp=https" {
		t.Errorf("h2 -> h2c: %s %q", resp.Proto, body)
	}
	if resp.Trailer.Get("Grpc-Status") != "0" {
		t.Errorf("trailer lost: %v", resp.Trailer)
	}

	// Plain HTTP/1.1 client to the h2c backend.
	resp, err = h.client().Post("http://grpc.com/x?y=1", "text/plain", strings.NewReader("one"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "HTTP/2.0 POST /x?y=1 grpc.com body=one xfp=http" {
		t.Errorf("h1 -> h2c: %d %q", resp.StatusCode, body)
	}
	// Chunked request body from an HTTP/1.1 client.
	r, b := h.raw("POST /c HTTP/1.1\r\nHost: grpc.com\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
	if r == nil || r.StatusCode != 200 || !strings.Contains(b, "body=abc") {
		t.Errorf("chunked h1 -> h2c: %v %q", r, b)
	}
}

func TestTimeouts(t *testing.T) {
	// A backend that accepts and never answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()
	h := newHarness(t, Config{UpstreamReadTimeout: 200 * time.Millisecond, ReadHeaderTimeout: 200 * time.Millisecond, IdleTimeout: 300 * time.Millisecond},
		endpointsInput(oneRoute("slow.com", "svc"), map[string][]string{"svc": {ln.Addr().String()}}))
	start := time.Now()
	resp, _ := h.raw("GET / HTTP/1.1\r\nHost: slow.com\r\n\r\n")
	if resp == nil || resp.StatusCode != 504 {
		t.Errorf("silent backend: %v", resp)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("504 took %v", d)
	}

	// Slowloris: a head that never completes is cut off.
	c, err := net.Dial("tcp", h.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: slow.com\r\n")
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	start = time.Now()
	if _, err := c.Read(make([]byte, 10)); err == nil {
		t.Error("partial head got an answer")
	} else if isTimeout(err) {
		t.Error("connection with a partial head was not closed")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("partial head held for %v", d)
	}

	// An idle keep-alive connection is closed after IdleTimeout.
	c2, err := net.Dial("tcp", h.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_ = c2.SetReadDeadline(time.Now().Add(3 * time.Second))
	start = time.Now()
	if _, err := c2.Read(make([]byte, 10)); err == nil || isTimeout(err) {
		t.Errorf("idle connection: %v", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 2*time.Second {
		t.Errorf("idle connection closed after %v, want about 300ms", d)
	}
}

// TestSwapUnderLoad changes the routing table continuously while clients
// send requests: no request may fail or reach the wrong backend.
func TestSwapUnderLoad(t *testing.T) {
	a, b := newBackend(t, "a"), newBackend(t, "b")
	mk := func(gen int) []*networkingv1.Ingress {
		// The route for /a and /b never changes in meaning; the table
		// around it does (extra rules, new Ingresses, endpoint moves).
		ings := []*networkingv1.Ingress{newIngress("main", 0, rule("load.com", path("/a", prefix, "sa"), path("/b", prefix, "sb")))}
		for i := 0; i < gen%7; i++ {
			ings = append(ings, newIngress("extra"+string(rune('a'+i)), i+1, rule("x"+string(rune('a'+i))+".com", path("/", prefix, "sa"))))
		}
		return ings
	}
	in := endpointsInput(mk(0), map[string][]string{"sa": {a.hostPort()}, "sb": {b.hostPort()}})
	h := newHarness(t, Config{}, in)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := h.client()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				want := "a"
				if (i+w)%2 == 1 {
					want = "b"
				}
				resp, err := c.Get("http://load.com/" + want + "/x")
				if err != nil {
					mu.Lock()
					failures = append(failures, err.Error())
					mu.Unlock()
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || resp.Header.Get("X-Backend") != want {
					mu.Lock()
					failures = append(failures, resp.Status+" from "+resp.Header.Get("X-Backend"))
					mu.Unlock()
				}
			}
		}(w)
	}
	for gen := 1; gen <= 50; gen++ {
		in.ings = mk(gen)
		h.rebuild()
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if len(failures) > 0 {
		t.Errorf("%d failures during 50 table swaps, first: %s", len(failures), failures[0])
	}
	if n := h.counter("knit_ingress_config_swaps_total"); n < 51 {
		t.Errorf("swaps %v", n)
	}
}
