package dns

import (
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// specObjects is a small cluster with one of everything the specification
// covers.
func specObjects() []runtime.Object {
	web := service("prod", "web", "10.43.1.5",
		port("http", corev1.ProtocolTCP, 80), port("dns", corev1.ProtocolUDP, 53), port("", corev1.ProtocolTCP, 8080))
	web.Spec.ClusterIPs = []string{"10.43.1.5", "fd43::5"}
	peers := service("prod", "peers", corev1.ClusterIPNone)
	peers.Spec.PublishNotReadyAddresses = true
	ext := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "ext"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "www.example.com"},
	}
	alias := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "alias"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "web.prod.svc.cluster.local"},
	}
	return []runtime.Object{
		service("default", "kubernetes", "10.43.0.1", port("https", corev1.ProtocolTCP, 443)),
		web,
		service("prod", "db", corev1.ClusterIPNone, port("pg", corev1.ProtocolTCP, 5432)),
		slice("prod", "db-v4", "db", discoveryv1.AddressTypeIPv4, []ep{
			{ip: "10.42.1.10", hostname: "db-0"},
			{ip: "10.42.2.11"},
			{ip: "10.42.3.12", hostname: "db-2", notReady: true},
		}, slicePort("pg", corev1.ProtocolTCP, 5432)),
		slice("prod", "db-v6", "db", discoveryv1.AddressTypeIPv6, []ep{
			{ip: "fd42::1:a", hostname: "db-0"},
		}, slicePort("pg", corev1.ProtocolTCP, 5432)),
		peers,
		slice("prod", "peers-1", "peers", discoveryv1.AddressTypeIPv4, []ep{{ip: "10.42.1.20", notReady: true}}),
		service("prod", "empty", corev1.ClusterIPNone),
		ext,
		alias,
		pod("prod", "db-0", "10.42.1.10", "fd42::1:a"),
	}
}

const soa = "SOA ns.dns.cluster.local. hostmaster.cluster.local."

func TestSpecRecords(t *testing.T) {
	f := newFixture(t, testConfig(), true, true, specObjects()...)
	tests := []struct {
		name  string
		qtype uint16
		rcode int
		ans   []string // rrStrings of the answer section
		ns    string   // prefix of the authority section's only record, if any
		extra []string // rrStrings of the additional section, if checked
	}{
		// 2.2 schema version
		{"dns-version.cluster.local.", mdns.TypeTXT, 0, []string{`TXT "1.1.0"`}, "", nil},
		// 2.3 ClusterIP Services
		{"kubernetes.default.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.43.0.1"}, "", nil},
		{"KUBERNETES.Default.SVC.Cluster.Local.", mdns.TypeA, 0, []string{"A 10.43.0.1"}, "", nil},
		{"kubernetes.default.svc.cluster.local.", mdns.TypeAAAA, 0, nil, soa, nil},
		{"web.prod.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.43.1.5"}, "", nil},
		{"web.prod.svc.cluster.local.", mdns.TypeAAAA, 0, []string{"AAAA fd43::5"}, "", nil},
		{"_https._tcp.kubernetes.default.svc.cluster.local.", mdns.TypeSRV, 0,
			[]string{"SRV 0 100 443 kubernetes.default.svc.cluster.local."}, "", []string{"A 10.43.0.1"}},
		{"_http._tcp.web.prod.svc.cluster.local.", mdns.TypeSRV, 0,
			[]string{"SRV 0 100 80 web.prod.svc.cluster.local."}, "", []string{"A 10.43.1.5", "AAAA fd43::5"}},
		{"_dns._udp.web.prod.svc.cluster.local.", mdns.TypeSRV, 0, []string{"SRV 0 100 53 web.prod.svc.cluster.local."}, "", nil},
		{"_http._udp.web.prod.svc.cluster.local.", mdns.TypeSRV, mdns.RcodeNameError, nil, soa, nil},
		{"_tcp.web.prod.svc.cluster.local.", mdns.TypeSRV, 0, nil, soa, nil}, // empty non-terminal
		{"5.1.43.10.in-addr.arpa.", mdns.TypePTR, 0, []string{"PTR web.prod.svc.cluster.local."}, "", nil},
		{"1.0.43.10.in-addr.arpa.", mdns.TypePTR, 0, []string{"PTR kubernetes.default.svc.cluster.local."}, "", nil},
		{"5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.3.4.d.f.ip6.arpa.", mdns.TypePTR, 0,
			[]string{"PTR web.prod.svc.cluster.local."}, "", nil},
		{"99.99.43.10.in-addr.arpa.", mdns.TypePTR, mdns.RcodeNameError, nil, "SOA", nil},
		{"43.10.in-addr.arpa.", mdns.TypeSOA, 0, []string{soa + " "}, "", nil},
		// 2.4 headless Services
		{"db.prod.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.42.1.10", "A 10.42.2.11"}, "", nil},
		{"db.prod.svc.cluster.local.", mdns.TypeAAAA, 0, []string{"AAAA fd42::1:a"}, "", nil},
		{"db-0.db.prod.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.42.1.10"}, "", nil},
		{"db-0.db.prod.svc.cluster.local.", mdns.TypeAAAA, 0, []string{"AAAA fd42::1:a"}, "", nil},
		{"10-42-2-11.db.prod.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.42.2.11"}, "", nil},
		{"db-2.db.prod.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil}, // not ready
		{"_pg._tcp.db.prod.svc.cluster.local.", mdns.TypeSRV, 0, []string{
			"SRV 0 50 5432 10-42-2-11.db.prod.svc.cluster.local.",
			"SRV 0 50 5432 db-0.db.prod.svc.cluster.local.",
		}, "", []string{"A 10.42.1.10", "A 10.42.2.11", "AAAA fd42::1:a"}},
		{"10.1.42.10.in-addr.arpa.", mdns.TypePTR, 0, []string{"PTR db-0.db.prod.svc.cluster.local."}, "", nil},
		{"11.2.42.10.in-addr.arpa.", mdns.TypePTR, 0, []string{"PTR 10-42-2-11.db.prod.svc.cluster.local."}, "", nil},
		{"12.3.42.10.in-addr.arpa.", mdns.TypePTR, mdns.RcodeNameError, nil, "SOA", nil},
		{"peers.prod.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.42.1.20"}, "", nil}, // publishNotReadyAddresses
		{"empty.prod.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},   // no ready endpoint
		// 2.5 ExternalName
		{"ext.prod.svc.cluster.local.", mdns.TypeCNAME, 0, []string{"CNAME www.example.com."}, "", nil},
		{"alias.prod.svc.cluster.local.", mdns.TypeA, 0, []string{"A 10.43.1.5", "CNAME web.prod.svc.cluster.local."}, "", nil},
		// 2.6 pod records, verified
		{"10-42-1-10.prod.pod.cluster.local.", mdns.TypeA, 0, []string{"A 10.42.1.10"}, "", nil},
		{"fd42--1-a.prod.pod.cluster.local.", mdns.TypeAAAA, 0, []string{"AAAA fd42::1:a"}, "", nil},
		{"10-42-1-11.prod.pod.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},
		{"10-42-1-10.other.pod.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},
		// zone structure and negative answers
		{"cluster.local.", mdns.TypeSOA, 0, []string{soa + " "}, "", nil},
		{"cluster.local.", mdns.TypeNS, 0, []string{"NS ns.dns.cluster.local."}, "", nil},
		{"svc.cluster.local.", mdns.TypeA, 0, nil, soa, nil},
		{"prod.svc.cluster.local.", mdns.TypeA, 0, nil, soa, nil},
		{"prod.pod.cluster.local.", mdns.TypeA, 0, nil, soa, nil},
		{"nons.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},
		{"nothere.prod.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},
		{"web.prod.svc.cluster.local.", mdns.TypeMX, 0, nil, soa, nil},
		{"web.prod.svc.cluster.local.", 65280, 0, nil, soa, nil}, // unknown type: NODATA
		{"www.google.com.prod.svc.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},
		{"foo.cluster.local.", mdns.TypeA, mdns.RcodeNameError, nil, soa, nil},
		{"web.prod.svc.cluster.local.", mdns.TypeANY, 0, []string{`HINFO "RFC8482" ""`}, "", nil},
		{"cluster.local.", mdns.TypeAXFR, mdns.RcodeRefused, nil, "", nil},
		{"cluster.local.", mdns.TypeIXFR, mdns.RcodeRefused, nil, "", nil},
		{"example.com.", mdns.TypeANY, 0, []string{`HINFO "RFC8482" ""`}, "", nil},
	}
	for _, tc := range tests {
		t.Run(mdns.TypeToString[tc.qtype]+" "+tc.name, func(t *testing.T) {
			r := f.ask(tc.name, tc.qtype)
			if r == nil {
				t.Fatal("no response")
			}
			if r.Rcode != tc.rcode {
				t.Fatalf("rcode %s, want %s\n%v", mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tc.rcode], r)
			}
			if r.Question[0].Name != tc.name {
				t.Errorf("question %q, want the query's case %q", r.Question[0].Name, tc.name)
			}
			got := rrStrings(r.Answer)
			want := slices.Clone(tc.ans)
			slices.Sort(want)
			if len(want) > 0 && strings.HasSuffix(want[0], " ") {
				// SOA: compare the prefix only (serial varies).
				if len(got) != 1 || !strings.HasPrefix(got[0], want[0]) {
					t.Errorf("answer %q, want %q...", got, want)
				}
			} else if !slices.Equal(got, want) {
				t.Errorf("answer\n got %q\nwant %q", got, want)
			}
			if tc.ns != "" {
				ns := rrStrings(r.Ns)
				if len(ns) != 1 || !strings.HasPrefix(ns[0], tc.ns) {
					t.Errorf("authority %q, want one %q...", ns, tc.ns)
				} else if ttl := r.Ns[0].Header().Ttl; ttl != 5 || r.Ns[0].(*mdns.SOA).Minttl != 5 {
					t.Errorf("negative TTL %d/%d, want 5", ttl, r.Ns[0].(*mdns.SOA).Minttl)
				}
			}
			if tc.extra != nil {
				if got := rrStrings(r.Extra); !slices.Equal(got, tc.extra) {
					t.Errorf("additional\n got %q\nwant %q", got, tc.extra)
				}
			}
			for _, rr := range r.Answer {
				if rr.Header().Rrtype != mdns.TypeTXT && rr.Header().Ttl != 5 {
					t.Errorf("TTL %d, want 5: %v", rr.Header().Ttl, rr)
				}
			}
			if tc.rcode != mdns.RcodeRefused && !r.Authoritative && tc.name != "example.com." {
				t.Errorf("AA not set")
			}
		})
	}
}

// Without a Pod informer there are no pod records and no pod subdomain.
func TestPodRecordsNeedPodInformer(t *testing.T) {
	f := newFixture(t, testConfig(), false, true, specObjects()...)
	r := f.ask("10-42-1-10.prod.pod.cluster.local.", mdns.TypeA)
	if r.Rcode != mdns.RcodeNameError {
		t.Fatalf("pod record without pod informer: %v", r)
	}
	if r := f.ask("pod.cluster.local.", mdns.TypeA); r.Rcode != mdns.RcodeNameError {
		t.Fatalf("pod.cluster.local without pod records: %s", mdns.RcodeToString[r.Rcode])
	}
}

func TestSyncGate(t *testing.T) {
	f := newFixture(t, testConfig(), true, false, specObjects()...)
	for _, name := range []string{"kubernetes.default.svc.cluster.local.", "nothere.svc.cluster.local.", "dns-version.cluster.local.", "1.0.43.10.in-addr.arpa."} {
		r := f.ask(name, mdns.TypeA)
		if r.Rcode != mdns.RcodeServerFailure {
			t.Errorf("%s before sync: %s, want SERVFAIL", name, mdns.RcodeToString[r.Rcode])
		}
	}
	if f.s.Ready() {
		t.Fatal("ready before sync")
	}
	f.factory.Start(f.ctx.Done())
	go f.s.runSync(f.ctx)
	deadline := time.Now().Add(5 * time.Second)
	for !f.s.Ready() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if r := f.ask("kubernetes.default.svc.cluster.local.", mdns.TypeA); r.Rcode != 0 || len(r.Answer) != 1 {
		t.Fatalf("after sync: %v", r)
	}
}

// TestChanges follows Services and endpoints as they change: created
// resolvable, endpoints moving, deleted NXDOMAIN, all well within 1 s.
func TestChanges(t *testing.T) {
	f := newFixture(t, testConfig(), true, true)
	ctx := f.ctx
	cs := f.client
	wait := func(name string, qtype uint16, want func(*mdns.Msg) bool) {
		t.Helper()
		deadline := time.Now().Add(time.Second)
		for {
			r := f.ask(name, qtype)
			if want(r) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s %s after 1s: %v", name, mdns.TypeToString[qtype], r)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	hasA := func(ip string) func(*mdns.Msg) bool {
		return func(r *mdns.Msg) bool {
			return r.Rcode == 0 && slices.Contains(rrStrings(r.Answer), "A "+ip)
		}
	}
	nx := func(r *mdns.Msg) bool { return r.Rcode == mdns.RcodeNameError }

	svc := service("ns1", "a", "10.43.7.7", port("http", corev1.ProtocolTCP, 80))
	if _, err := cs.CoreV1().Services("ns1").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("a.ns1.svc.cluster.local.", mdns.TypeA, hasA("10.43.7.7"))
	wait("ns1.svc.cluster.local.", mdns.TypeA, func(r *mdns.Msg) bool { return r.Rcode == 0 })

	// Headless: endpoints come, change readiness, go.
	h := service("ns1", "h", corev1.ClusterIPNone)
	if _, err := cs.CoreV1().Services("ns1").Create(ctx, h, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("h.ns1.svc.cluster.local.", mdns.TypeA, nx)
	sl := slice("ns1", "h-1", "h", discoveryv1.AddressTypeIPv4, []ep{{ip: "10.42.5.5", hostname: "x"}})
	if _, err := cs.DiscoveryV1().EndpointSlices("ns1").Create(ctx, sl, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("x.h.ns1.svc.cluster.local.", mdns.TypeA, hasA("10.42.5.5"))
	sl = slice("ns1", "h-1", "h", discoveryv1.AddressTypeIPv4, []ep{{ip: "10.42.5.6", hostname: "x"}})
	if _, err := cs.DiscoveryV1().EndpointSlices("ns1").Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("x.h.ns1.svc.cluster.local.", mdns.TypeA, hasA("10.42.5.6"))
	wait("5.5.42.10.in-addr.arpa.", mdns.TypePTR, nx)
	sl = slice("ns1", "h-1", "h", discoveryv1.AddressTypeIPv4, []ep{{ip: "10.42.5.6", hostname: "x", notReady: true}})
	if _, err := cs.DiscoveryV1().EndpointSlices("ns1").Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("h.ns1.svc.cluster.local.", mdns.TypeA, nx)
	wait("x.h.ns1.svc.cluster.local.", mdns.TypeA, nx)

	// Deleted Services answer NXDOMAIN, and so does their empty namespace.
	for _, name := range []string{"a", "h"} {
		if err := cs.CoreV1().Services("ns1").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	wait("a.ns1.svc.cluster.local.", mdns.TypeA, nx)
	wait("_http._tcp.a.ns1.svc.cluster.local.", mdns.TypeSRV, nx)
	wait("7.7.43.10.in-addr.arpa.", mdns.TypePTR, nx)
	wait("ns1.svc.cluster.local.", mdns.TypeA, nx)

	// Pods in verified mode.
	p := pod("ns1", "p", "10.42.9.9")
	if _, err := cs.CoreV1().Pods("ns1").Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("10-42-9-9.ns1.pod.cluster.local.", mdns.TypeA, hasA("10.42.9.9"))
	p.Status.Phase = corev1.PodSucceeded
	if _, err := cs.CoreV1().Pods("ns1").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("10-42-9-9.ns1.pod.cluster.local.", mdns.TypeA, nx)
}
