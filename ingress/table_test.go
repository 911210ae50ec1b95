package ingress

import (
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// --- object helpers shared by the tests ---

var t0 = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

func newIngress(name string, age int, rules ...networkingv1.IngressRule) *networkingv1.Ingress {
	class := "knit"
	return &networkingv1.Ingress{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:         "default",
			Name:              name,
			CreationTimestamp: metav1.NewTime(t0.Add(time.Duration(age) * time.Minute)),
		},
		Spec: networkingv1.IngressSpec{IngressClassName: &class, Rules: rules},
	}
}

func rule(host string, paths ...networkingv1.HTTPIngressPath) networkingv1.IngressRule {
	r := networkingv1.IngressRule{Host: host}
	if paths != nil {
		r.HTTP = &networkingv1.HTTPIngressRuleValue{Paths: paths}
	}
	return r
}

func svcBackend(svc string) networkingv1.IngressBackend {
	return networkingv1.IngressBackend{Service: &networkingv1.IngressServiceBackend{
		Name: svc, Port: networkingv1.ServiceBackendPort{Number: 80}}}
}

func path(p string, pt networkingv1.PathType, svc string) networkingv1.HTTPIngressPath {
	return networkingv1.HTTPIngressPath{Path: p, PathType: &pt, Backend: svcBackend(svc)}
}

const (
	exact  = networkingv1.PathTypeExact
	prefix = networkingv1.PathTypePrefix
	implSp = networkingv1.PathTypeImplementationSpecific
)

func knitClass(isDefault bool) *networkingv1.IngressClass {
	c := &networkingv1.IngressClass{
		ObjectMeta: metav1.ObjectMeta{Name: "knit"},
		Spec:       networkingv1.IngressClassSpec{Controller: "knit.dev/ingress"},
	}
	if isDefault {
		c.Annotations = map[string]string{annotationDefaultClass: "true"}
	}
	return c
}

// staticInput is cache content where every Service named in an Ingress
// exists with port 80 (unless listed in missing) and has the endpoints
// given in eps.
type staticInput struct {
	ings    []*networkingv1.Ingress
	classes []*networkingv1.IngressClass
	eps     map[string][]string // service -> endpoint IPs
	missing map[string]bool
	secrets map[string]*corev1.Secret
	svcs    map[string]*corev1.Service
}

func (s *staticInput) input() *buildInput {
	classes := s.classes
	if classes == nil {
		classes = []*networkingv1.IngressClass{knitClass(false)}
	}
	return &buildInput{
		ingresses: s.ings,
		classes:   classes,
		service: func(ns, name string) *corev1.Service {
			if svc := s.svcs[name]; svc != nil {
				return svc
			}
			if s.missing[name] {
				return nil
			}
			return &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
				Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
			}
		},
		slices: func(ns, svc string) []*discoveryv1.EndpointSlice {
			return slicesFor(ns, svc, s.eps[svc])
		},
		secret: func(ns, name string) *corev1.Secret { return s.secrets[name] },
	}
}

func testBuilder(t testing.TB, cfg Config) *builder {
	t.Helper()
	cfg.setDefaults()
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	set := newSettings(&cfg)
	return &builder{cfg: &cfg, ups: newUpstreams(set, m, log), certs: newCertCache(), m: m}
}

func buildTable(t testing.TB, in *staticInput) *buildResult {
	t.Helper()
	return testBuilder(t, Config{}).build(in.input())
}

// describe names the rule a request reached: "Exact /foo", "Prefix /",
// "default:svc", or "none".
func describe(r *route) string {
	switch {
	case r == nil:
		return "none"
	case r.path == "":
		return "default:" + strings.TrimSuffix(strings.TrimPrefix(r.backend.name, "default/"), ":80")
	case r.exact:
		return "Exact " + r.path
	default:
		return "Prefix " + r.path
	}
}

func lookup(t *table, host, p string) *route {
	return t.lookup(normalizeHost(nil, []byte(host)), []byte(p))
}

// TestDocsPathExamples is the examples table of the Kubernetes Ingress
// documentation (concepts/services-networking/ingress, "Examples"), row by
// row, plus the "Multiple matches" rule.
func TestDocsPathExamples(t *testing.T) {
	type rp struct {
		path string
		typ  networkingv1.PathType
	}
	P := func(ps ...string) []rp {
		var out []rp
		for _, p := range ps {
			out = append(out, rp{p, prefix})
		}
		return out
	}
	E := func(p string) []rp { return []rp{{p, exact}} }
	tests := []struct {
		kind     string
		paths    []rp
		requests []string
		want     string // the rule that matches; "none" means the default backend answers
	}{
		{"Prefix", P("/"), []string{"/", "/foo", "/foo/bar/", "/aaa/bbb?x=1"}, "Prefix /"},
		{"Exact", E("/foo"), []string{"/foo"}, "Exact /foo"},
		{"Exact", E("/foo"), []string{"/bar"}, "none"},
		{"Exact", E("/foo"), []string{"/foo/"}, "none"},
		{"Exact", E("/foo/"), []string{"/foo"}, "none"},
		{"Prefix", P("/foo"), []string{"/foo", "/foo/"}, "Prefix /foo"},
		{"Prefix", P("/foo/"), []string{"/foo", "/foo/"}, "Prefix /foo/"},
		{"Prefix", P("/aaa/bb"), []string{"/aaa/bbb"}, "none"},
		{"Prefix", P("/aaa/bbb"), []string{"/aaa/bbb"}, "Prefix /aaa/bbb"},
		{"Prefix", P("/aaa/bbb/"), []string{"/aaa/bbb"}, "Prefix /aaa/bbb/"},   // ignores trailing slash
		{"Prefix", P("/aaa/bbb"), []string{"/aaa/bbb/"}, "Prefix /aaa/bbb"},    // matches trailing slash
		{"Prefix", P("/aaa/bbb"), []string{"/aaa/bbb/ccc"}, "Prefix /aaa/bbb"}, // matches subpath
		{"Prefix", P("/aaa/bbb"), []string{"/aaa/bbbxyz"}, "none"},             // not a string prefix
		{"Prefix", P("/", "/aaa"), []string{"/aaa/ccc"}, "Prefix /aaa"},        // matches /aaa prefix
		{"Prefix", P("/", "/aaa", "/aaa/bbb"), []string{"/aaa/bbb"}, "Prefix /aaa/bbb"},
		{"Prefix", P("/", "/aaa", "/aaa/bbb"), []string{"/ccc"}, "Prefix /"},
		{"Prefix", P("/aaa"), []string{"/ccc"}, "none"},                                    // uses default backend
		{"Mixed", []rp{{"/foo", prefix}, {"/foo", exact}}, []string{"/foo"}, "Exact /foo"}, // prefers Exact
		// Multiple matches: longest first, then Exact over Prefix.
		{"Mixed", []rp{{"/foo", exact}, {"/foo/bar", prefix}}, []string{"/foo/bar"}, "Prefix /foo/bar"},
		{"Mixed", []rp{{"/foo", prefix}, {"/foo/", exact}}, []string{"/foo/"}, "Exact /foo/"},
		{"Mixed", []rp{{"/foo/", prefix}, {"/foo", exact}}, []string{"/foo"}, "Exact /foo"},
		{"Mixed", []rp{{"/foo", prefix}, {"/foo", exact}}, []string{"/foo/"}, "Prefix /foo"},
		// ImplementationSpecific is Prefix.
		{"ImplementationSpecific", []rp{{"/foo", implSp}}, []string{"/foo/x", "/foo"}, "Prefix /foo"},
		{"ImplementationSpecific", []rp{{"/foo", implSp}}, []string{"/foox"}, "none"},
		// Matching is case-sensitive.
		{"Exact", E("/Foo"), []string{"/foo"}, "none"},
		{"Prefix", P("/Foo"), []string{"/foo/x"}, "none"},
	}
	for _, tc := range tests {
		var paths []networkingv1.HTTPIngressPath
		for _, p := range tc.paths {
			paths = append(paths, path(p.path, p.typ, "svc"))
		}
		ing := newIngress("a", 0, rule("", paths...))
		ing.Spec.DefaultBackend = ptr(svcBackend("fallback"))
		res := buildTable(t, &staticInput{ings: []*networkingv1.Ingress{ing}})
		if len(res.problems) != 0 {
			t.Fatalf("%s %v: problems %v", tc.kind, tc.paths, res.problems)
		}
		for _, req := range tc.requests {
			p, _, _ := strings.Cut(req, "?")
			want := tc.want
			if want == "none" {
				want = "default:fallback"
			}
			if got := describe(lookup(res.table, "example.com", p)); got != want {
				t.Errorf("%s rules %v, request %s: got %s, want %s", tc.kind, tc.paths, req, got, want)
			}
		}
	}
}

func ptr[T any](v T) *T { return &v }

// TestDocsHostWildcards is the documentation's hostname wildcard table,
// plus precedence of exact hosts over wildcards over host-less rules.
func TestDocsHostWildcards(t *testing.T) {
	ings := []*networkingv1.Ingress{
		newIngress("wild", 0, rule("*.foo.com", path("/", prefix, "wild"))),
		newIngress("exact", 1, rule("bar.foo.com", path("/only", prefix, "exact"))),
		newIngress("any", 2, rule("", path("/", prefix, "any"))),
	}
	res := buildTable(t, &staticInput{ings: ings})
	tests := []struct{ host, path, want string }{
		{"baz.foo.com", "/", "wild"},        // matches based on shared suffix
		{"baz.bar.foo.com", "/", "any"},     // wildcard covers a single label only
		{"foo.com", "/", "any"},             // ... and not zero labels
		{"bar.foo.com", "/only/x", "exact"}, // exact host beats the wildcard
		{"bar.foo.com", "/other", "wild"},   // no path of the exact host: next group
		{"BAR.Foo.COM:8443", "/only", "exact"},
		{"bar.foo.com.", "/only", "exact"},
		{"x.foo.com:80", "/", "wild"},
		{".foo.com", "/", "any"},
		{"unknown.example", "/", "any"},
	}
	for _, tc := range tests {
		r := lookup(res.table, tc.host, tc.path)
		got := "none"
		if r != nil {
			got = strings.TrimSuffix(strings.TrimPrefix(r.backend.name, "default/"), ":80")
		}
		if got != tc.want {
			t.Errorf("host %q path %q: got %s, want %s", tc.host, tc.path, got, tc.want)
		}
	}
}

func TestDefaultBackends(t *testing.T) {
	withDef := newIngress("site", 0, rule("site.com", path("/app", prefix, "app")))
	withDef.Spec.DefaultBackend = ptr(svcBackend("site-default"))
	catchAll := newIngress("catchall", 1)
	catchAll.Spec.DefaultBackend = ptr(svcBackend("catch-all"))
	plain := newIngress("plain", 2, rule("plain.com", path("/x", exact, "x")))

	tests := []struct {
		name        string
		ings        []*networkingv1.Ingress
		controller  string
		host, path  string
		want        string
		wantProblem string
	}{
		{name: "rule wins", ings: []*networkingv1.Ingress{withDef}, host: "site.com", path: "/app/1", want: "Prefix /app"},
		{name: "ingress default for its host", ings: []*networkingv1.Ingress{withDef}, host: "site.com", path: "/nope", want: "default:site-default"},
		{name: "ingress default not for other hosts", ings: []*networkingv1.Ingress{withDef}, host: "other.com", path: "/", want: "none"},
		{name: "catch-all for unknown host", ings: []*networkingv1.Ingress{withDef, catchAll}, host: "other.com", path: "/", want: "default:catch-all"},
		{name: "catch-all for unmatched path of a host without default", ings: []*networkingv1.Ingress{plain, catchAll}, host: "plain.com", path: "/y", want: "default:catch-all"},
		{name: "host default before catch-all", ings: []*networkingv1.Ingress{withDef, catchAll}, host: "site.com", path: "/nope", want: "default:site-default"},
		{name: "controller default last", ings: []*networkingv1.Ingress{plain}, controller: "kube-system/default-http:80", host: "other.com", path: "/", want: "default:kube-system/default-http"},
		{name: "ingress catch-all before controller default", ings: []*networkingv1.Ingress{catchAll}, controller: "kube-system/default-http:80", host: "other.com", path: "/", want: "default:catch-all"},
		{name: "no default: 404", ings: []*networkingv1.Ingress{plain}, host: "plain.com", path: "/y", want: "none"},
	}
	for _, tc := range tests {
		b := testBuilder(t, Config{DefaultBackend: tc.controller})
		res := b.build((&staticInput{ings: tc.ings}).input())
		if got := describe(lookup(res.table, tc.host, tc.path)); got != tc.want {
			t.Errorf("%s: got %s, want %s", tc.name, got, tc.want)
		}
	}
}

func TestConflictsOldestWins(t *testing.T) {
	older := newIngress("older", 0, rule("a.com", path("/x", prefix, "old"), path("/e", exact, "old")))
	newer := newIngress("newer", 5, rule("a.com",
		path("/x/", prefix, "new"), // same as "/x": conflict
		path("/e", exact, "new"),   // conflict
		path("/e", prefix, "new"),  // different type: no conflict
		path("/y", prefix, "new")))
	for _, order := range [][]*networkingv1.Ingress{{older, newer}, {newer, older}} {
		res := buildTable(t, &staticInput{ings: order})
		check := func(p, want string) {
			r := lookup(res.table, "a.com", p)
			if r == nil || r.backend.name != "default/"+want+":80" {
				t.Errorf("path %s: got %v, want %s", p, r, want)
			}
		}
		check("/x/1", "old")
		check("/e", "old")
		check("/e/1", "new")
		check("/y", "new")
		var conflicts []string
		for _, p := range res.problems {
			if p.reason == reasonConflict {
				if p.ingress.Name != "newer" {
					t.Errorf("conflict reported on %s, want on the newer Ingress", p.ingress)
				}
				conflicts = append(conflicts, p.message)
			}
		}
		if len(conflicts) != 2 {
			t.Errorf("conflicts %q, want 2", conflicts)
		}
	}
	// Same creation time: namespace/name decides, also deterministically.
	a := newIngress("a", 0, rule("t.com", path("/", prefix, "from-a")))
	bb := newIngress("b", 0, rule("t.com", path("/", prefix, "from-b")))
	for _, order := range [][]*networkingv1.Ingress{{a, bb}, {bb, a}} {
		res := buildTable(t, &staticInput{ings: order})
		if r := lookup(res.table, "t.com", "/"); r.backend.name != "default/from-a:80" {
			t.Errorf("tie: got %s", r.backend.name)
		}
	}
}

func TestBackendProblems(t *testing.T) {
	res := &networkingv1.IngressBackend{Resource: &corev1.TypedLocalObjectReference{
		APIGroup: ptr("k8s.example.com"), Kind: "StorageBucket", Name: "icons"}}
	ing := newIngress("p", 0, rule("p.com",
		networkingv1.HTTPIngressPath{Path: "/icons", PathType: ptr(implSp), Backend: *res},
		path("/gone", prefix, "missing"),
		networkingv1.HTTPIngressPath{Path: "/badport", PathType: ptr(prefix), Backend: networkingv1.IngressBackend{
			Service: &networkingv1.IngressServiceBackend{Name: "svc", Port: networkingv1.ServiceBackendPort{Number: 81}}}},
		path("bad", prefix, "svc"),
		path("/a//b", exact, "svc"),
		path("/ok", prefix, "svc"),
	), rule("Bad_Host", path("/", prefix, "svc")))
	out := buildTable(t, &staticInput{ings: []*networkingv1.Ingress{ing}, missing: map[string]bool{"missing": true}})
	reasons := map[string]int{}
	for _, p := range out.problems {
		reasons[p.reason]++
	}
	want := map[string]int{reasonUnsupportedBackend: 1, reasonServiceNotFound: 1, reasonPortNotFound: 1, reasonInvalidPath: 2, reasonInvalidHost: 1}
	for r, n := range want {
		if reasons[r] != n {
			t.Errorf("reason %s: %d problems, want %d (all: %v)", r, reasons[r], n, out.problems)
		}
	}
	for _, tc := range []struct {
		path string
		code int
		msg  string
	}{
		{"/icons", 503, "Resource backend"},
		{"/gone", 503, "not found"},
		{"/badport", 503, "no port 81"},
	} {
		r := lookup(out.table, "p.com", tc.path)
		if r == nil || r.backend.kind != kindError || r.backend.status != tc.code || !strings.Contains(r.backend.msg, tc.msg) {
			t.Errorf("%s: got %+v", tc.path, r)
		}
	}
	if r := lookup(out.table, "p.com", "/ok"); r == nil || r.backend.kind != kindService {
		t.Errorf("/ok must still be served: %+v", r)
	}
}

func TestClassSelection(t *testing.T) {
	named := func(name string, class *string, legacy string) *networkingv1.Ingress {
		i := newIngress(name, 0, rule(name+".com", path("/", prefix, "s")))
		i.Spec.IngressClassName = class
		if legacy != "" {
			i.Annotations = map[string]string{annotationLegacyClass: legacy}
		}
		return i
	}
	ings := []*networkingv1.Ingress{
		named("ours", ptr("knit"), ""),
		named("theirs", ptr("nginx"), ""),
		named("classless", nil, ""),
		named("legacy", nil, "knit"),
		named("legacytheirs", nil, "nginx"),
		named("unknownclass", ptr("nope"), ""),
	}
	other := &networkingv1.IngressClass{ObjectMeta: metav1.ObjectMeta{Name: "nginx"},
		Spec: networkingv1.IngressClassSpec{Controller: "k8s.io/ingress-nginx"}}
	tests := []struct {
		name    string
		classes []*networkingv1.IngressClass
		watch   bool
		want    string
	}{
		{"not default", []*networkingv1.IngressClass{knitClass(false), other}, false, "legacy ours"},
		{"default class", []*networkingv1.IngressClass{knitClass(true), other}, false, "classless legacy ours"},
		{"watch without class", []*networkingv1.IngressClass{knitClass(false), other}, true, "classless legacy ours"},
		{"no class object", []*networkingv1.IngressClass{other}, false, ""},
	}
	for _, tc := range tests {
		cfg := Config{WatchIngressWithoutClass: tc.watch}
		cfg.setDefaults()
		var got []string
		for _, i := range servedIngresses(ings, tc.classes, &cfg) {
			got = append(got, i.Name)
		}
		sortStrings(got)
		if strings.Join(got, " ") != tc.want {
			t.Errorf("%s: served %q, want %q", tc.name, got, tc.want)
		}
	}
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

func TestEndpointsResolution(t *testing.T) {
	// Service port "web" (80) -> slices with targetPort resolved per slice
	// by name; not-ready and terminating endpoints are skipped.
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "metrics", Port: 9090},
			{Name: "web", Port: 80, AppProtocol: ptr("kubernetes.io/h2c")},
		}},
	}
	in := (&staticInput{}).input()
	in.service = func(ns, name string) *corev1.Service { return svc }
	web, metricsName := "web", "metrics"
	in.slices = func(ns, s string) []*discoveryv1.EndpointSlice {
		return []*discoveryv1.EndpointSlice{{
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{
				{Name: &metricsName, Port: ptr(int32(9100))},
				{Name: &web, Port: ptr(int32(8080))},
			},
			Endpoints: []discoveryv1.Endpoint{
				{Addresses: []string{"10.42.1.2"}},
				{Addresses: []string{"10.42.1.3"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}},
				{Addresses: []string{"10.42.1.4"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Terminating: ptr(true)}},
			},
		}, {
			AddressType: discoveryv1.AddressTypeIPv6,
			Ports:       []discoveryv1.EndpointPort{{Name: &web, Port: ptr(int32(8081))}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"fd42::5"}}, {Addresses: []string{"10.42.1.2"}}},
		}, {
			AddressType: discoveryv1.AddressTypeFQDN,
			Ports:       []discoveryv1.EndpointPort{{Name: &web, Port: ptr(int32(80))}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"example.com"}}},
		}}
	}
	byName := newIngress("n", 0, rule("h.com", networkingv1.HTTPIngressPath{Path: "/", PathType: ptr(prefix),
		Backend: networkingv1.IngressBackend{Service: &networkingv1.IngressServiceBackend{
			Name: "web", Port: networkingv1.ServiceBackendPort{Name: "web"}}}}))
	in.ingresses = []*networkingv1.Ingress{byName}
	res := testBuilder(t, Config{}).build(in)
	r := lookup(res.table, "h.com", "/")
	var got []string
	for _, e := range r.backend.eps {
		got = append(got, e.addr)
	}
	want := "10.42.1.2:8080 10.42.1.2:8081 10.42.1.3:8080 [fd42::5]:8081"
	if strings.Join(got, " ") != want {
		t.Errorf("endpoints %q, want %q", got, want)
	}
	if !r.backend.h2c || r.backend.name != "default/web:web" {
		t.Errorf("backend %+v", r.backend)
	}
}

func TestLookupAllocatesNothing(t *testing.T) {
	var ings []*networkingv1.Ingress
	for i := 0; i < 50; i++ {
		h := "h" + string(rune('a'+i%26)) + strings.Repeat("x", i/26) + ".example.com"
		ings = append(ings, newIngress(h, i, rule(h, path("/api", prefix, "a"), path("/", prefix, "b"), path("/x/y", exact, "c"))))
	}
	ings = append(ings, newIngress("w", 99, rule("*.example.com", path("/", prefix, "w"))))
	res := buildTable(t, &staticInput{ings: ings})
	host, p := []byte("ha.example.com"), []byte("/api/v1/users/42")
	wild := []byte("zz.example.com")
	allocs := testing.AllocsPerRun(1000, func() {
		if res.table.lookup(host, p) == nil || res.table.lookup(wild, p) == nil {
			t.Fatal("no route")
		}
	})
	if allocs != 0 {
		t.Errorf("lookup allocates %.1f times", allocs)
	}
}
