package dns

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// fakeUpstream is a resolver on 127.0.0.1, UDP and TCP on one port.
type fakeUpstream struct {
	addr    string
	mu      sync.Mutex
	queries map[string]int // "name type net" -> count
	last    *mdns.Msg
	answer  func(w mdns.ResponseWriter, r *mdns.Msg) *mdns.Msg
	servers []*mdns.Server
}

func newUpstream(t testing.TB, answer func(w mdns.ResponseWriter, r *mdns.Msg) *mdns.Msg) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{queries: map[string]int{}, answer: answer}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.addr = pc.LocalAddr().String()
	ln, err := net.Listen("tcp", u.addr)
	if err != nil {
		t.Fatal(err)
	}
	h := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		u.mu.Lock()
		u.queries[strings.ToLower(r.Question[0].Name)+" "+mdns.TypeToString[r.Question[0].Qtype]+" "+w.RemoteAddr().Network()]++
		u.last = r.Copy()
		u.mu.Unlock()
		if resp := u.answer(w, r); resp != nil {
			_ = w.WriteMsg(resp)
		}
	})
	for _, s := range []*mdns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		u.servers = append(u.servers, s)
		go func() { _ = s.ActivateAndServe() }()
	}
	t.Cleanup(u.stop)
	return u
}

func (u *fakeUpstream) stop() {
	for _, s := range u.servers {
		_ = s.Shutdown()
	}
}

func (u *fakeUpstream) count(key string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.queries[key]
}

func (u *fakeUpstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.queries {
		n += c
	}
	return n
}

// zoneAnswers answers like a small authoritative server: A 192.0.2.1 for
// names under example.com with TTL 60, NXDOMAIN (with SOA) for
// nx.example.com, NXDOMAIN without SOA for nosoa.example.com, 40 addresses
// for big.example.com (truncated over UDP).
func zoneAnswers(w mdns.ResponseWriter, r *mdns.Msg) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetReply(r)
	q := r.Question[0]
	name := strings.ToLower(q.Name)
	switch {
	case name == "nx.example.com.":
		m.Rcode = mdns.RcodeNameError
		m.Ns = []mdns.RR{mustRR("example.com. 30 IN SOA ns.example.com. h.example.com. 1 2 3 4 10")}
	case name == "nosoa.example.com.":
		m.Rcode = mdns.RcodeNameError
	case name == "big.example.com.":
		for i := 0; i < 40; i++ {
			m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, byte(i+1))})
		}
		if w.RemoteAddr().Network() == "udp" {
			m.Answer = nil
			m.Truncated = true
		}
	case q.Qtype == mdns.TypeA:
		m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 1)}}
	default:
		m.Ns = []mdns.RR{mustRR("example.com. 30 IN SOA ns.example.com. h.example.com. 1 2 3 4 10")}
	}
	if o := r.IsEdns0(); o != nil {
		m.SetEdns0(o.UDPSize(), o.Do())
	}
	return m
}

func mustRR(s string) mdns.RR {
	rr, err := mdns.NewRR(s)
	if err != nil {
		panic(err)
	}
	return rr
}

func forwardFixture(t *testing.T, up *fakeUpstream, mut func(*Config)) *fixture {
	cfg := testConfig()
	cfg.Upstreams = []string{up.addr}
	cfg.UpstreamTimeout = 300 * time.Millisecond
	if mut != nil {
		mut(&cfg)
	}
	return newFixture(t, cfg, false, true, specObjects()...)
}

func TestForwardAndCache(t *testing.T) {
	up := newUpstream(t, zoneAnswers)
	f := forwardFixture(t, up, nil)

	r := f.ask("WwW.ExAmple.COM.", mdns.TypeA)
	if r.Rcode != 0 || !slices.Equal(rrStrings(r.Answer), []string{"A 192.0.2.1"}) {
		t.Fatalf("forwarded answer: %v", r)
	}
	if r.Question[0].Name != "WwW.ExAmple.COM." {
		t.Errorf("question case %q not the query's", r.Question[0].Name)
	}
	if r.Authoritative || !r.RecursionAvailable {
		t.Errorf("flags: aa=%v ra=%v", r.Authoritative, r.RecursionAvailable)
	}
	// Again, other case: from the cache.
	r = f.ask("www.example.com.", mdns.TypeA)
	if r.Rcode != 0 || len(r.Answer) != 1 || r.Answer[0].Header().Ttl > 60 {
		t.Fatalf("cached answer: %v", r)
	}
	if n := up.count("www.example.com. A udp"); n != 1 {
		t.Errorf("upstream asked %d times, want 1 (second from cache)", n)
	}
	if hits := testutil.ToFloat64(f.s.m.cacheHits); hits != 1 {
		t.Errorf("cache hits %v, want 1", hits)
	}

	// Negative answers are cached for the SOA's negative TTL...
	for range 2 {
		r = f.ask("nx.example.com.", mdns.TypeA)
		if r.Rcode != mdns.RcodeNameError || len(r.Ns) != 1 {
			t.Fatalf("NXDOMAIN: %v", r)
		}
	}
	if n := up.count("nx.example.com. A udp"); n != 1 {
		t.Errorf("negative answer asked upstream %d times, want 1", n)
	}
	// ... NODATA too ...
	for range 2 {
		if r = f.ask("www.example.com.", mdns.TypeMX); r.Rcode != 0 || len(r.Answer) != 0 {
			t.Fatalf("NODATA: %v", r)
		}
	}
	if n := up.count("www.example.com. MX udp"); n != 1 {
		t.Errorf("NODATA asked upstream %d times, want 1", n)
	}
	// ... but not without a SOA saying for how long.
	for range 2 {
		if r = f.ask("nosoa.example.com.", mdns.TypeA); r.Rcode != mdns.RcodeNameError {
			t.Fatalf("NXDOMAIN without SOA: %v", r)
		}
	}
	if n := up.count("nosoa.example.com. A udp"); n != 2 {
		t.Errorf("NXDOMAIN without SOA asked upstream %d times, want 2", n)
	}
}

func TestCacheAgesTTL(t *testing.T) {
	up := newUpstream(t, zoneAnswers)
	f := forwardFixture(t, up, nil)
	f.ask("age.example.com.", mdns.TypeA)
	// Pretend the entry was stored 15 s ago.
	key := cacheKey(nil, []byte("\x03age\x07example\x03com\x00"), mdns.TypeA, false, false)
	e := f.s.cache.get(key, time.Now().UnixNano())
	if e == nil {
		t.Fatal("not cached")
	}
	e.stored -= int64(15 * time.Second)
	r := f.ask("age.example.com.", mdns.TypeA)
	if ttl := r.Answer[0].Header().Ttl; ttl != 45 {
		t.Errorf("TTL %d after 15 s, want 45", ttl)
	}
	// Expired: asked again.
	e.expires = time.Now().UnixNano() - 1
	f.ask("age.example.com.", mdns.TypeA)
	if n := up.count("age.example.com. A udp"); n != 2 {
		t.Errorf("upstream asked %d times, want 2 (expired entry)", n)
	}
}

func TestTruncationAndTCPFallback(t *testing.T) {
	up := newUpstream(t, zoneAnswers)
	f := forwardFixture(t, up, nil)

	// Over UDP without EDNS: 40 addresses do not fit in 512 bytes.
	r := f.ask("big.example.com.", mdns.TypeA)
	if !r.Truncated || len(r.Answer) != 0 || r.Rcode != 0 {
		t.Fatalf("want an empty TC answer, got %v", r)
	}
	if up.count("big.example.com. A tcp") != 1 {
		t.Errorf("truncated upstream answer not retried over TCP: %v", up.queries)
	}
	// With EDNS 1232 it fits, from the cache.
	r = f.ask("big.example.com.", mdns.TypeA, withEDNS(4096, false))
	if r.Truncated || len(r.Answer) != 40 {
		t.Fatalf("EDNS answer: tc=%v %d answers", r.Truncated, len(r.Answer))
	}
	if o := r.IsEdns0(); o == nil || o.UDPSize() != 1232 {
		t.Errorf("OPT in response: %v", o)
	}
	// Over TCP, whole.
	m := new(mdns.Msg)
	m.SetQuestion("big.example.com.", mdns.TypeA)
	req, _ := m.Pack()
	if r = f.askRaw(req, true); r.Truncated || len(r.Answer) != 40 {
		t.Fatalf("TCP answer: tc=%v %d answers", r.Truncated, len(r.Answer))
	}
	if n := up.count("big.example.com. A udp") + up.count("big.example.com. A tcp"); n != 2 {
		t.Errorf("upstream asked %d times, want 2", n)
	}
}

func TestEDNSPassthrough(t *testing.T) {
	up := newUpstream(t, zoneAnswers)
	f := forwardFixture(t, up, nil)
	r := f.ask("dnssec.example.com.", mdns.TypeA, func(m *mdns.Msg) {
		m.SetEdns0(1400, true)
		o := m.IsEdns0()
		o.Option = append(o.Option, &mdns.EDNS0_NSID{Code: mdns.EDNS0NSID})
	})
	up.mu.Lock()
	last := up.last
	up.mu.Unlock()
	o := last.IsEdns0()
	if o == nil || !o.Do() || o.UDPSize() != 1232 || len(o.Option) != 1 || o.Option[0].Option() != mdns.EDNS0NSID {
		t.Fatalf("upstream saw OPT %v", o)
	}
	if ro := r.IsEdns0(); ro == nil || !ro.Do() {
		t.Fatalf("response OPT %v, want DO echoed", ro)
	}
	// The DO bit is part of the cache key.
	f.ask("dnssec.example.com.", mdns.TypeA)
	if n := up.count("dnssec.example.com. A udp"); n != 2 {
		t.Errorf("upstream asked %d times, want 2 (with and without DO)", n)
	}
}

func TestConcurrencyBoundAndSharing(t *testing.T) {
	release := make(chan struct{})
	up := newUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) *mdns.Msg {
		<-release
		return zoneAnswers(w, r)
	})
	f := forwardFixture(t, up, func(c *Config) {
		c.MaxConcurrentForwards = 3
		c.UpstreamTimeout = 2 * time.Second
	})
	var wg sync.WaitGroup
	results := make([]*mdns.Msg, 3)
	for i, name := range []string{"a.example.com.", "a.example.com.", "b.example.com."} {
		wg.Add(1)
		go func() { defer wg.Done(); results[i] = f.ask(name, mdns.TypeA) }()
	}
	deadline := time.Now().Add(2 * time.Second)
	for len(f.s.fwd.sem) < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	r := f.ask("c.example.com.", mdns.TypeA)
	if r.Rcode != mdns.RcodeServerFailure || time.Since(start) > 100*time.Millisecond {
		t.Errorf("over the bound: %s after %v, want SERVFAIL at once", mdns.RcodeToString[r.Rcode], time.Since(start))
	}
	close(release)
	wg.Wait()
	for i, r := range results {
		if r.Rcode != 0 || len(r.Answer) != 1 {
			t.Errorf("query %d: %v", i, r)
		}
	}
	if n := up.count("a.example.com. A udp"); n != 1 {
		t.Errorf("identical questions in flight asked upstream %d times, want 1", n)
	}
	if v := testutil.ToFloat64(f.s.m.forwardRejected); v != 1 {
		t.Errorf("rejected %v, want 1", v)
	}
}

func TestUpstreamDown(t *testing.T) {
	up := newUpstream(t, zoneAnswers)
	f := forwardFixture(t, up, func(c *Config) { c.UpstreamTimeout = 100 * time.Millisecond })
	if r := f.ask("kept.example.com.", mdns.TypeA); r.Rcode != 0 {
		t.Fatal(r)
	}
	up.stop()
	// Cached answers keep being served.
	if r := f.ask("kept.example.com.", mdns.TypeA); r.Rcode != 0 || len(r.Answer) != 1 {
		t.Fatalf("cached answer with upstream down: %v", r)
	}
	// Others fail; after a few failures the upstream is marked down and
	// failures are immediate.
	for i := range failuresToDown {
		if r := f.ask("new.example.com.", mdns.TypeA); r.Rcode != mdns.RcodeServerFailure {
			t.Fatalf("query %d with upstream down: %v", i, r)
		}
	}
	start := time.Now()
	if r := f.ask("other.example.com.", mdns.TypeA); r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("with upstream marked down: %v", r)
	}
	if d := time.Since(start); d > 20*time.Millisecond {
		t.Errorf("SERVFAIL took %v with every upstream down, want at once", d)
	}
	// Cluster names do not care.
	if r := f.ask("kubernetes.default.svc.cluster.local.", mdns.TypeA); r.Rcode != 0 {
		t.Fatalf("cluster name with upstream down: %v", r)
	}
}

func TestUpstreamAnswerToOtherQuestion(t *testing.T) {
	up := newUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) *mdns.Msg {
		m := zoneAnswers(w, r)
		m.Question[0].Name = "evil.example.com."
		return m
	})
	f := forwardFixture(t, up, nil)
	if r := f.ask("victim.example.com.", mdns.TypeA); r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("mismatched upstream answer accepted: %v", r)
	}
	if f.s.cache.len() != 0 {
		t.Error("mismatched answer cached")
	}
}

func TestExternalNameChase(t *testing.T) {
	up := newUpstream(t, zoneAnswers)
	f := forwardFixture(t, up, nil)
	r := f.ask("ext.prod.svc.cluster.local.", mdns.TypeA)
	want := []string{"A 192.0.2.1", "CNAME www.example.com."}
	if r.Rcode != 0 || !slices.Equal(rrStrings(r.Answer), want) {
		t.Fatalf("ExternalName A: %v", r)
	}
	// A target that does not exist: NXDOMAIN after the CNAME.
	_, err := f.client.CoreV1().Services("prod").Create(f.ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "gone"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "nx.example.com"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	for {
		r = f.ask("gone.prod.svc.cluster.local.", mdns.TypeA)
		if len(r.Answer) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if r.Rcode != mdns.RcodeNameError || !slices.Equal(rrStrings(r.Answer), []string{"CNAME nx.example.com."}) {
		t.Fatalf("ExternalName to a missing name: %v", r)
	}
}

func TestStaticLoopRefused(t *testing.T) {
	cfg := testConfig()
	cfg.ListenAddrs = []netip.AddrPort{netip.MustParseAddrPort("10.43.0.10:53"), netip.MustParseAddrPort("127.0.0.1:5353")}
	cfg.Upstreams = []string{"10.43.0.10", "127.0.0.1:5353", "0.0.0.0"}
	f := newFixture(t, cfg, false, true)
	if n := len(f.s.fwd.upstreams); n != 0 {
		t.Fatalf("%d upstreams kept, want every self address refused", n)
	}
	if r := f.ask("example.com.", mdns.TypeA); r.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("no upstream: %v", r)
	}
}

func TestResolvConf(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	plain := write("plain", "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 2001:db8::53\noptions ndots:5\nnameserver bogus\n")
	got, note, err := ReadResolvConf(plain)
	if err != nil || note != "" || !slices.Equal(got, []string{"192.0.2.53:53", "[2001:db8::53]:53"}) {
		t.Fatalf("plain: %v %q %v", got, note, err)
	}
	stub := write("stub", "nameserver 127.0.0.53\noptions edns0 trust-ad\n")
	real := write("real", "nameserver 198.51.100.1\n")
	old := resolvedConf
	resolvedConf = real
	defer func() { resolvedConf = old }()
	got, note, err = ReadResolvConf(stub)
	if err != nil || note == "" || !slices.Equal(got, []string{"198.51.100.1:53"}) {
		t.Fatalf("systemd-resolved stub: %v %q %v", got, note, err)
	}
	resolvedConf = filepath.Join(dir, "missing")
	got, _, _ = ReadResolvConf(stub)
	if !slices.Equal(got, []string{"127.0.0.53:53"}) {
		t.Fatalf("stub without the resolved file: %v", got)
	}
}

// TestRunLoopDetection runs the server on real loopback sockets with an
// "upstream" that relays every query back to the server (what a node
// resolver pointing at the cluster DNS does). The loop probe must catch it,
// and queries must still be answered over UDP and TCP.
func TestRunLoopDetection(t *testing.T) {
	var target atomic.Value // our address, once bound
	relay := newUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) *mdns.Msg {
		to, _ := target.Load().(string)
		if to == "" {
			return nil
		}
		resp, _, err := (&mdns.Client{Timeout: time.Second}).Exchange(r, to)
		if err != nil {
			return nil
		}
		return resp
	})
	good := newUpstream(t, zoneAnswers)
	// A free port, known before Run so that the relay can loop at once.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close()
	target.Store(addr)
	cfg := testConfig()
	cfg.ListenAddrs = []netip.AddrPort{netip.MustParseAddrPort(addr)}
	cfg.Upstreams = []string{relay.addr, good.addr}
	cfg.UpstreamTimeout = 500 * time.Millisecond
	f := newFixture(t, cfg, false, false, specObjects()...)
	ctx, cancel := context.WithCancel(f.ctx)
	done := make(chan error, 1)
	f.factory.Start(ctx.Done())
	go func() { done <- f.s.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for (len(f.s.Bound()) == 0 || !f.s.Ready()) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if len(f.s.Bound()) == 0 || f.s.Bound()[0].String() != addr {
		t.Fatalf("bound %v, want %s", f.s.Bound(), addr)
	}

	for time.Now().Before(deadline) && testutil.ToFloat64(f.s.m.loops) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	if testutil.ToFloat64(f.s.m.loops) != 1 || !f.s.fwd.upstreams[0].looping.Load() || f.s.fwd.upstreams[1].looping.Load() {
		t.Fatalf("loop not detected on the relay only: loops=%v", testutil.ToFloat64(f.s.m.loops))
	}
	for _, netw := range []string{"udp", "tcp"} {
		c := &mdns.Client{Net: netw, Timeout: time.Second}
		m := new(mdns.Msg)
		m.SetQuestion("kubernetes.default.svc.cluster.local.", mdns.TypeA)
		r, _, err := c.Exchange(m, addr)
		if err != nil || r.Rcode != 0 || len(r.Answer) != 1 {
			t.Fatalf("%s cluster query: %v %v", netw, r, err)
		}
		m.SetQuestion("www.example.com.", mdns.TypeA)
		r, _, err = c.Exchange(m, addr)
		if err != nil || r.Rcode != 0 || len(r.Answer) != 1 {
			t.Fatalf("%s forwarded query (past the looping upstream): %v %v", netw, r, err)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}
