package dns

import (
	"fmt"
	"testing"

	mdns "github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// benchObjects is 1,000 ClusterIP Services, as in the CoreDNS anchor run.
func benchObjects() []runtime.Object {
	out := specObjects()
	for i := range 1000 {
		out = append(out, service(fmt.Sprintf("ns%d", i%20), fmt.Sprintf("svc%d", i),
			fmt.Sprintf("10.43.%d.%d", 10+i/250, 1+i%250), port("http", corev1.ProtocolTCP, 80)))
	}
	return out
}

// benchQuery runs one query through the same path as the UDP loop (handle
// on a reused worker), so that allocations per query are what a server
// reader goroutine pays.
func benchQuery(b *testing.B, f *fixture, name string, qtype uint16, edns bool) {
	m := q(name, qtype)
	if edns {
		m.SetEdns0(1232, false)
	}
	req := packed(b, m)
	w := newWorker()
	resp, slow := f.s.handle(f.ctx, w, req, false, modeFast)
	if slow || resp == nil {
		b.Fatalf("query %s does not take the fast path", name)
	}
	r := new(mdns.Msg)
	if err := r.Unpack(resp); err != nil || len(r.Answer) == 0 {
		b.Fatalf("bad answer: %v %v", r, err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		resp, _ = f.s.handle(f.ctx, w, req, false, modeFast)
	}
	_ = resp
}

func BenchmarkClusterName(b *testing.B) {
	f := newFixture(b, noForwardConfig(), false, true, benchObjects()...)
	b.Run("A", func(b *testing.B) { benchQuery(b, f, "svc517.ns17.svc.cluster.local.", mdns.TypeA, false) })
	b.Run("A-EDNS", func(b *testing.B) { benchQuery(b, f, "svc517.ns17.svc.cluster.local.", mdns.TypeA, true) })
	b.Run("SRV", func(b *testing.B) { benchQuery(b, f, "_http._tcp.svc517.ns17.svc.cluster.local.", mdns.TypeSRV, false) })
	b.Run("NXDOMAIN", func(b *testing.B) {
		m := q("www.example.com.ns17.svc.cluster.local.", mdns.TypeA)
		req := packed(b, m)
		w := newWorker()
		b.ReportAllocs()
		for b.Loop() {
			f.s.handle(f.ctx, w, req, false, modeFast)
		}
	})
}

func BenchmarkCachedExternal(b *testing.B) {
	up := newUpstream(b, zoneAnswers)
	cfg := testConfig()
	cfg.Upstreams = []string{up.addr}
	f := newFixture(b, cfg, false, true, benchObjects()...)
	// Fill the cache through the blocking path.
	if r := f.ask("www.example.com.", mdns.TypeA); r.Rcode != 0 {
		b.Fatalf("warm-up: %v", r)
	}
	b.Run("A", func(b *testing.B) { benchQuery(b, f, "www.example.com.", mdns.TypeA, false) })
}

// BenchmarkServeRaw includes the copy ServeRaw makes for its caller.
func BenchmarkServeRaw(b *testing.B) {
	f := newFixture(b, noForwardConfig(), false, true, benchObjects()...)
	req := packed(b, q("svc517.ns17.svc.cluster.local.", mdns.TypeA))
	b.ReportAllocs()
	for b.Loop() {
		f.s.ServeRaw(f.ctx, req, false)
	}
}
