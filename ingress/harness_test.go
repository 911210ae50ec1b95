package ingress

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// harness runs the data plane (server + builder) on 127.0.0.1 without
// informers: tests hand it cache content and rebuild at will.
type harness struct {
	t      testing.TB
	srv    *server
	b      *builder
	in     *staticInput
	cancel context.CancelFunc
	http   string // "127.0.0.1:port"
	https  string
	reg    *prometheus.Registry
}

func testLogger() *slog.Logger {
	if os.Getenv("KNIT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func newHarness(t testing.TB, cfg Config, in *staticInput) *harness {
	t.Helper()
	return newHarnessLog(t, cfg, in, testLogger())
}

func newHarnessLog(t testing.TB, cfg Config, in *staticInput, log *slog.Logger) *harness {
	t.Helper()
	cfg.HTTPAddr, cfg.HTTPSAddr = "127.0.0.1:0", "127.0.0.1:0"
	cfg.setDefaults()
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := newServer(&cfg, m, log)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, srv: srv, in: in, reg: reg}
	h.b = &builder{cfg: &cfg, ups: srv.ups, certs: newCertCache(), m: m}
	if err := srv.listen(cfg.HTTPAddr, cfg.HTTPSAddr); err != nil {
		t.Fatal(err)
	}
	h.http, h.https = srv.httpLn.Addr().String(), srv.httpsLn.Addr().String()
	// The redirect port is only known now.
	_, srv.set.httpsPort, _ = net.SplitHostPort(h.https)
	h.rebuild()
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	srv.serve(ctx)
	t.Cleanup(h.close)
	return h
}

func (h *harness) rebuild() *buildResult {
	res := h.b.build(h.in.input())
	h.srv.swap(res.table)
	h.srv.ups.prune(h.b.gen)
	return res
}

func (h *harness) close() {
	h.cancel()
	h.srv.shutdown(time.Second)
}

// client is an HTTP/1.1 client that talks to the ingress whatever the URL
// host says, like a client resolving every name to the node.
func (h *harness) client() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				var d net.Dialer
				if strings.HasSuffix(addr, ":443") {
					return d.DialContext(ctx, "tcp", h.https)
				}
				return d.DialContext(ctx, "tcp", h.http)
			},
			DisableCompression: true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Timeout:       10 * time.Second,
	}
}

// raw sends bytes on a new connection and reads one response.
func (h *harness) raw(s string) (*http.Response, string) {
	h.t.Helper()
	c, err := net.Dial("tcp", h.http)
	if err != nil {
		h.t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, s); err != nil {
		h.t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, ""
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(body)
}

func (h *harness) counter(name string) float64 {
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if c := m.GetCounter(); c != nil {
				total += c.GetValue()
			}
			if g := m.GetGauge(); g != nil {
				total += g.GetValue()
			}
		}
	}
	return total
}

// echo is what the test backend reports about the request it got.
type echo struct {
	Backend string
	Method  string
	Path    string
	Query   string
	Host    string
	Proto   string
	Header  http.Header
	Body    string
	Conn    string
}

// testBackend is an httptest server on 127.0.0.1 that echoes requests and
// counts connections.
type testBackend struct {
	*httptest.Server
	name  string
	conns atomic.Int32
	reqs  atomic.Int32
	mu    sync.Mutex
	paths []string
}

func (b *testBackend) seen() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.paths...)
}

func newBackend(t testing.TB, name string) *testBackend {
	b := &testBackend{name: name}
	b.Server = httptest.NewUnstartedServer(http.HandlerFunc(b.serve))
	b.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			b.conns.Add(1)
		}
	}
	b.Start()
	t.Cleanup(b.Close)
	return b
}

func (b *testBackend) serve(w http.ResponseWriter, r *http.Request) {
	b.reqs.Add(1)
	b.mu.Lock()
	b.paths = append(b.paths, r.URL.Path)
	b.mu.Unlock()
	body, _ := io.ReadAll(r.Body)
	if r.URL.Path == "/stream" {
		// Unknown length: chunked to HTTP/1.1.
		w.Header().Set("Content-Type", "text/plain")
		for i := 0; i < 3; i++ {
			io.WriteString(w, strings.Repeat("x", 5000))
			w.(http.Flusher).Flush()
		}
		return
	}
	if r.URL.Path == "/big" {
		w.Header().Set("Content-Length", "1000000")
		io.WriteString(w, strings.Repeat("y", 1000000))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Backend", b.name)
	json.NewEncoder(w).Encode(echo{
		Backend: b.name, Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Host: r.Host,
		Proto: r.Proto, Header: r.Header, Body: string(body), Conn: r.RemoteAddr,
	})
}

func (b *testBackend) hostPort() string { return b.Listener.Addr().String() }

func decodeEcho(t testing.TB, resp *http.Response) echo {
	t.Helper()
	defer resp.Body.Close()
	var e echo
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatalf("decode echo (status %d): %v", resp.StatusCode, err)
	}
	return e
}

// endpointsInput makes cache content where each service's endpoints are
// "ip:port" strings (one EndpointSlice per port).
func endpointsInput(ings []*networkingv1.Ingress, eps map[string][]string) *staticInput {
	return &staticInput{ings: ings, eps: eps}
}

// slicesFor makes EndpointSlices for endpoints given as "ip:port" (or
// "ip", port 8080), one slice per port, port name "http".
func slicesFor(ns, svc string, eps []string) []*discoveryv1.EndpointSlice {
	{
		byPort := map[string][]string{}
		var order []string
		for _, e := range eps {
			host, port, err := net.SplitHostPort(e)
			if err != nil {
				host, port = e, "8080"
			}
			if _, ok := byPort[port]; !ok {
				order = append(order, port)
			}
			byPort[port] = append(byPort[port], host)
		}
		var out []*discoveryv1.EndpointSlice
		for _, port := range order {
			name := "http"
			var p int32
			for _, c := range port {
				p = p*10 + int32(c-'0')
			}
			sl := &discoveryv1.EndpointSlice{
				ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: svc + "-" + port},
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &p}},
			}
			for _, ip := range byPort[port] {
				sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}})
			}
			out = append(out, sl)
		}
		return out
	}
}

// --- a test CA, created per test run ---

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "knit test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

var serial atomic.Int64

// secret issues a leaf for names and wraps it in a kubernetes.io/tls Secret.
func (ca *testCA) secret(t testing.TB, name string, names ...string) *corev1.Secret {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	n := serial.Add(1) + 100
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(n),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, ResourceVersion: big.NewInt(n).String()},
		Type:       corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}),
		},
	}
}

// tlsDial handshakes with the ingress for serverName and returns the
// peer's leaf certificate serial and negotiated protocol.
func (h *harness) tlsDial(serverName string, roots *x509.CertPool, alpn ...string) (*tls.Conn, error) {
	return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", h.https, &tls.Config{
		ServerName: serverName,
		RootCAs:    roots,
		NextProtos: alpn,
	})
}
