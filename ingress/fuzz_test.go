package ingress

import (
	"bytes"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
)

// fuzzRules is a fixed rule set touching every matching feature: hosts,
// wildcards, host-less rules, Exact and Prefix paths with and without
// trailing slashes, nested prefixes and a default backend.
var fuzzRules = []struct {
	host, path string
	typ        networkingv1.PathType
}{
	{"foo.com", "/", prefix},
	{"foo.com", "/a", prefix},
	{"foo.com", "/a/b/", prefix},
	{"foo.com", "/a/b", exact},
	{"foo.com", "/a/b/c", exact},
	{"foo.com", "/ab", implSp},
	{"*.foo.com", "/", prefix},
	{"*.foo.com", "/x/y", prefix},
	{"*.foo.com", "/x", exact},
	{"bar.foo.com", "/only", prefix},
	{"", "/any", prefix},
	{"", "/any/exact", exact},
	{"xn--bcher-kva.example", "/%C3%BC", prefix},
}

func fuzzTable(t testing.TB) *table {
	var ings []*networkingv1.Ingress
	for i, r := range fuzzRules {
		ings = append(ings, newIngress("i"+string(rune('a'+i)), i, rule(r.host, path(r.path, r.typ, "s"+string(rune('a'+i))))))
	}
	def := newIngress("zdefault", 100)
	def.Spec.DefaultBackend = ptr(svcBackend("default"))
	ings = append(ings, def)
	res := buildTable(t, &staticInput{ings: ings})
	if len(res.problems) != 0 {
		t.Fatalf("problems: %v", res.problems)
	}
	return res.table
}

// elements splits a path into its elements, ignoring trailing empty ones.
func elements(p string) []string {
	e := strings.Split(strings.TrimPrefix(p, "/"), "/")
	for len(e) > 0 && e[len(e)-1] == "" {
		e = e[:len(e)-1]
	}
	return e
}

// referenceMatch is the Ingress specification written as plainly as
// possible, to check the table against: which rule (index into fuzzRules,
// -1 for the default backend) should answer.
func referenceMatch(host, p string) int {
	h := strings.ToLower(host)
	if strings.HasPrefix(h, "[") {
		if i := strings.IndexByte(h, ']'); i > 0 {
			h = h[:i+1]
		}
	} else if i := strings.IndexByte(h, ':'); i >= 0 {
		h = h[:i]
	}
	h = strings.TrimSuffix(h, ".")
	hostMatches := func(rule string) bool { return rule != "" && !strings.HasPrefix(rule, "*.") && rule == h }
	wildMatches := func(rule string) bool {
		if !strings.HasPrefix(rule, "*.") {
			return false
		}
		i := strings.IndexByte(h, '.')
		return i > 0 && h[i+1:] == rule[2:]
	}
	for _, group := range []func(string) bool{
		hostMatches,
		wildMatches,
		func(rule string) bool { return rule == "" },
	} {
		best, bestLen, bestExact := -1, -1, false
		for i, r := range fuzzRules {
			if !group(r.host) {
				continue
			}
			var ok bool
			var l int
			if r.typ == exact {
				ok, l = p == r.path, len(r.path)
			} else {
				re, pe := elements(r.path), elements(p)
				ok = len(re) <= len(pe)
				for j := 0; ok && j < len(re); j++ {
					ok = re[j] == pe[j]
				}
				l = len(strings.TrimRight(r.path, "/"))
			}
			if ok && (l > bestLen || (l == bestLen && r.typ == exact && !bestExact)) {
				best, bestLen, bestExact = i, l, r.typ == exact
			}
		}
		if best >= 0 {
			return best
		}
	}
	return -1
}

func FuzzMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"foo.com", "/a/b"}, {"FOO.com:80", "/a/b/"}, {"x.foo.com", "/x"}, {"x.y.foo.com", "/"},
		{"foo.com.", "/ab/c"}, {"bar.foo.com", "/onlyx"}, {"", "/any/exact/"}, {"[::1]:80", "/any"},
		{"foo.com", "//a"}, {"foo.com", "/a//b"}, {".foo.com", "/"}, {"foo.com", "/a/b/c/"},
	} {
		f.Add(s[0], s[1])
	}
	tbl := fuzzTable(f)
	f.Fuzz(func(t *testing.T, host, p string) {
		if !strings.HasPrefix(p, "/") {
			p = "/" + p
		}
		r := tbl.lookup(normalizeHost(nil, []byte(host)), []byte(p))
		want := referenceMatch(host, p)
		got := -1
		if r != nil && r.path != "" {
			for i, fr := range fuzzRules {
				if r.path == fr.path && (r.exact == (fr.typ == exact)) && r.host == fr.host {
					got = i
				}
			}
		} else if r == nil {
			t.Fatalf("no route at all for %q %q (the default backend must answer)", host, p)
		}
		if got != want {
			gs, ws := "default", "default"
			if got >= 0 {
				gs = fuzzRules[got].host + " " + fuzzRules[got].path
			}
			if want >= 0 {
				ws = fuzzRules[want].host + " " + fuzzRules[want].path
			}
			t.Fatalf("host %q path %q: table picked %s, specification says %s", host, p, gs, ws)
		}
	})
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a.com\r\n\r\n",
		"POST /x?y HTTP/1.1\r\nHost: a.com\r\nContent-Length: 3\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
		"GET http://a.com/p HTTP/1.1\r\nHost: b\r\n\r\n",
		"GET /a/../b HTTP/1.0\r\n\r\n",
		"GET / HTTP/1.1\nHost: a\n\n",
		"\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close, x-a, upgrade\r\nUpgrade: websocket\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	lim := limits{maxHeaderBytes: 1 << 20, maxHeaderCount: 100}
	f.Fuzz(func(t *testing.T, b []byte) {
		n := findHeadEnd(b, 0)
		if n < 0 {
			return
		}
		var h reqHead
		if err := parseRequestHead(b[:n], &h, lim); err != nil {
			return
		}
		if h.chunked && h.contentLength >= 0 {
			t.Fatal("accepted both Transfer-Encoding and Content-Length")
		}
		if len(h.path) == 0 || h.path[0] != '/' {
			t.Fatalf("path %q", h.path)
		}
		if hasDotSegment(h.path) {
			t.Fatalf("dot segment in %q", h.path)
		}
		for _, c := range h.host {
			if !hostByte[c] {
				t.Fatalf("host %q", h.host)
			}
		}
		for _, hd := range h.headers {
			if bytes.ContainsAny(hd.value, "\r\n\x00") || bytes.ContainsAny(hd.name, " \t:\r\n") {
				t.Fatalf("header %q: %q", hd.name, hd.value)
			}
		}
	})
}

func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
		"HTTP/1.1 204\r\n\r\n",
		"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		n := findHeadEnd(b, 0)
		if n < 0 {
			return
		}
		var h respHead
		if err := parseResponseHead(b[:n], &h, 100); err != nil {
			return
		}
		if h.chunked && h.contentLength >= 0 {
			t.Fatal("accepted both framings")
		}
		if h.status < 100 || h.status > 999 {
			t.Fatalf("status %d", h.status)
		}
	})
}
