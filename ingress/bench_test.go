package ingress

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	networkingv1 "k8s.io/api/networking/v1"
)

// rawBackend is a minimal keep-alive HTTP/1.1 server with a fixed answer,
// cheap enough that a benchmark measures the proxy, not the backend.
func rawBackend(tb testing.TB, body string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	resp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 16<<10)
				have := 0
				for {
					n, err := c.Read(buf[have:])
					if err != nil {
						return
					}
					have += n
					for {
						i := bytes.Index(buf[:have], []byte("\r\n\r\n"))
						if i < 0 {
							break
						}
						copy(buf, buf[i+4:have])
						have -= i + 4
						if _, err := c.Write(resp); err != nil {
							return
						}
					}
				}
			}()
		}
	}()
	tb.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

// rawClient sends one request and reads one Content-Length response.
type rawClient struct {
	c   net.Conn
	br  *bufio.Reader
	req []byte
}

func (rc *rawClient) do() error {
	if _, err := rc.c.Write(rc.req); err != nil {
		return err
	}
	cl := -1
	for {
		line, err := rc.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) <= 2 {
			break
		}
		if len(line) > 16 && (line[0] == 'C' || line[0] == 'c') && strings.EqualFold(string(line[:15]), "content-length:") {
			cl, _ = strconv.Atoi(strings.TrimSpace(string(line[15:])))
		}
	}
	if cl < 0 {
		return io.ErrUnexpectedEOF
	}
	_, err := rc.br.Discard(cl)
	return err
}

func benchProxy(b *testing.B, addr string) {
	req := []byte("GET /api/v1/items?id=42 HTTP/1.1\r\nHost: bench.example.com\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
	b.ReportAllocs()
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Error(err)
			return
		}
		defer c.Close()
		rc := &rawClient{c: c, br: bufio.NewReaderSize(c, 16<<10), req: req}
		for pb.Next() {
			if err := rc.do(); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func benchIngresses(n int) []*networkingv1.Ingress {
	ings := []*networkingv1.Ingress{newIngress("bench", 0, rule("bench.example.com", path("/api", prefix, "svc"), path("/", prefix, "svc")))}
	for i := 0; i < n; i++ {
		h := "host" + strconv.Itoa(i) + ".example.com"
		ings = append(ings, newIngress(h, i+1, rule(h, path("/p"+strconv.Itoa(i), prefix, "svc"))))
	}
	return ings
}

// BenchmarkKnitProxy is the fast path end to end on loopback: client ->
// knit -> backend, 4 keep-alive connections per GOMAXPROCS.
func BenchmarkKnitProxy(b *testing.B) {
	be := rawBackend(b, "hello, world\n")
	h := newHarness(b, Config{}, endpointsInput(benchIngresses(1000), map[string][]string{"svc": {be}}))
	benchProxy(b, h.http)
}

// BenchmarkReverseProxy is the same through net/http and
// httputil.ReverseProxy, for comparison.
func BenchmarkReverseProxy(b *testing.B) {
	be := rawBackend(b, "hello, world\n")
	u, _ := url.Parse("http://" + be)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.Transport = &http.Transport{MaxIdleConnsPerHost: 256}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: rp}
	go srv.Serve(ln)
	defer srv.Close()
	benchProxy(b, ln.Addr().String())
}

// BenchmarkBackendDirect is the client and backend alone: subtract it from
// the proxy benchmarks to see what the proxy costs.
func BenchmarkBackendDirect(b *testing.B) {
	benchProxy(b, rawBackend(b, "hello, world\n"))
}

// TestServeForBenchmark runs the proxy as a standalone process for wrk
// against a fixed table, when KNIT_INGRESS_BENCH_LISTEN (address) and
// KNIT_INGRESS_BENCH_BACKEND (ip:port) are set; it serves until SIGTERM.
// KNIT_INGRESS_BENCH_RULES adds that many extra Ingresses.
func TestServeForBenchmark(t *testing.T) {
	listen, be := os.Getenv("KNIT_INGRESS_BENCH_LISTEN"), os.Getenv("KNIT_INGRESS_BENCH_BACKEND")
	if listen == "" || be == "" {
		t.Skip("set KNIT_INGRESS_BENCH_LISTEN and KNIT_INGRESS_BENCH_BACKEND to run")
	}
	n, _ := strconv.Atoi(os.Getenv("KNIT_INGRESS_BENCH_RULES"))
	cfg := Config{AccessLog: os.Getenv("KNIT_INGRESS_BENCH_ACCESSLOG") != ""}
	cfg.setDefaults()
	in := endpointsInput(benchIngresses(n), map[string][]string{"svc": strings.Split(be, ",")})
	h := &harness{t: t, in: in}
	m, _ := newMetrics(prometheus.NewRegistry())
	srv, err := newServer(&cfg, m, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	h.srv = srv
	h.b = &builder{cfg: &cfg, ups: srv.ups, certs: newCertCache(), m: m}
	if err := srv.listen(listen, ""); err != nil {
		t.Fatal(err)
	}
	h.rebuild()
	ctx, cancel := context.WithCancel(context.Background())
	srv.serve(ctx)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	cancel()
	srv.shutdown(time.Second)
}
