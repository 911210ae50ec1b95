package dns

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
)

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// fixture is a Server on a fake clientset with its informers running.
type fixture struct {
	t       testing.TB
	client  *fake.Clientset
	factory informers.SharedInformerFactory
	s       *Server
	reg     *prometheus.Registry
	ctx     context.Context
}

func testConfig() Config {
	return Config{
		ClusterDomain: "cluster.local",
		ListenAddrs:   []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")},
		Upstreams:     []string{"127.0.0.1:1"}, // replaced by tests that forward
		ServiceCIDRs:  []netip.Prefix{netip.MustParsePrefix("10.43.0.0/16"), netip.MustParsePrefix("fd43::/112")},
		ClusterCIDRs:  []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd42::/56")},
	}
}

// newFixture builds the server; start=false leaves the informers (and the
// sync loop) stopped, to test the sync gate.
func newFixture(t testing.TB, cfg Config, withPods, start bool, objs ...runtime.Object) *fixture {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	f := &fixture{t: t, client: fake.NewClientset(objs...), reg: prometheus.NewRegistry(), ctx: ctx}
	f.factory = informers.NewSharedInformerFactory(f.client, 0)
	src := Sources{Services: f.factory.Core().V1().Services(), EndpointSlices: f.factory.Discovery().V1().EndpointSlices()}
	if withPods {
		src.Pods = f.factory.Core().V1().Pods()
	}
	s, err := New(cfg, src, f.reg, testLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	f.s = s
	if start {
		f.factory.Start(ctx.Done())
		go s.runSync(ctx)
		deadline := time.Now().Add(5 * time.Second)
		for !s.Ready() {
			if time.Now().After(deadline) {
				t.Fatal("server not ready after 5s")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Cleanup(func() { cancel(); f.factory.Shutdown() })
	return f
}

// ask sends one query through the raw query path and unpacks the answer.
func (f *fixture) ask(name string, qtype uint16, opts ...func(*mdns.Msg)) *mdns.Msg {
	f.t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	for _, o := range opts {
		o(m)
	}
	req, err := m.Pack()
	if err != nil {
		f.t.Fatalf("pack %s: %v", name, err)
	}
	return f.askRaw(req, false)
}

func (f *fixture) askRaw(req []byte, tcp bool) *mdns.Msg {
	f.t.Helper()
	resp := f.s.ServeRaw(f.ctx, req, tcp)
	if resp == nil {
		return nil
	}
	r := new(mdns.Msg)
	if err := r.Unpack(resp); err != nil {
		f.t.Fatalf("unpack response: %v", err)
	}
	return r
}

func withEDNS(size uint16, do bool) func(*mdns.Msg) {
	return func(m *mdns.Msg) { m.SetEdns0(size, do) }
}

// rrStrings renders records without owner, TTL and class, sorted:
// "A 10.43.0.1", "SRV 0 100 80 web.prod.svc.cluster.local.".
func rrStrings(rrs []mdns.RR) []string {
	var out []string
	for _, rr := range rrs {
		if rr.Header().Rrtype == mdns.TypeOPT {
			continue
		}
		f := strings.Fields(rr.String())
		// owner ttl class type rdata...
		out = append(out, strings.Join(append([]string{f[3]}, f[4:]...), " "))
	}
	sort.Strings(out)
	return out
}

func service(ns, name, clusterIP string, ports ...corev1.ServicePort) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: clusterIP, Ports: ports},
	}
	if clusterIP != "" && clusterIP != corev1.ClusterIPNone {
		s.Spec.ClusterIPs = []string{clusterIP}
	}
	return s
}

func port(name string, proto corev1.Protocol, p int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: p}
}

type ep struct {
	ip       string
	hostname string
	notReady bool
}

func slice(ns, name, svc string, family discoveryv1.AddressType, eps []ep, ports ...discoveryv1.EndpointPort) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: family,
		Ports:       ports,
	}
	for _, e := range eps {
		x := discoveryv1.Endpoint{Addresses: []string{e.ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(!e.notReady)}}
		if e.hostname != "" {
			x.Hostname = ptr.To(e.hostname)
		}
		sl.Endpoints = append(sl.Endpoints, x)
	}
	return sl
}

func slicePort(name string, proto corev1.Protocol, p int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr.To(name), Protocol: ptr.To(proto), Port: ptr.To(p)}
}

func pod(ns, name string, ips ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}
