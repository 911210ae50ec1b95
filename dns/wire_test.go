package dns

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	mdns "github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func packed(t testing.TB, m *mdns.Msg) []byte {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func q(name string, qtype uint16) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	m.Id = 0x1234
	return m
}

// badInputs are requests that must get a precise error, or nothing.
func badInputs(t testing.TB) []struct {
	name  string
	req   []byte
	rcode int // -1: no response
} {
	hdr := func(flags uint16, qd, an, ns, ar uint16) []byte {
		b := make([]byte, 12)
		binary.BigEndian.PutUint16(b[0:], 0x1234)
		binary.BigEndian.PutUint16(b[2:], flags)
		binary.BigEndian.PutUint16(b[4:], qd)
		binary.BigEndian.PutUint16(b[6:], an)
		binary.BigEndian.PutUint16(b[8:], ns)
		binary.BigEndian.PutUint16(b[10:], ar)
		return b
	}
	question := func(name []byte, qtype, class uint16) []byte {
		return append(name, byte(qtype>>8), byte(qtype), byte(class>>8), byte(class))
	}
	www := []byte("\x03www\x07example\x03com\x00")
	notify := q("example.com.", mdns.TypeSOA)
	notify.Opcode = mdns.OpcodeNotify
	update := q("cluster.local.", mdns.TypeSOA)
	update.Opcode = mdns.OpcodeUpdate
	badvers := q("kubernetes.default.svc.cluster.local.", mdns.TypeA)
	badvers.SetEdns0(1232, false)
	badvers.IsEdns0().SetVersion(1)
	tsig := q("kubernetes.default.svc.cluster.local.", mdns.TypeA)
	tsig.SetTsig("key.", mdns.HmacSHA256, 300, 0)
	tsig.Extra[0].(*mdns.TSIG).MACSize = 0
	chaos := q("version.bind.", mdns.TypeTXT)
	chaos.Question[0].Qclass = mdns.ClassCHAOS
	twoOPT := packed(t, q("example.com.", mdns.TypeA))
	twoOPT = append(twoOPT, 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint16(twoOPT[10:], 2)
	long := make([]byte, 0, 300)
	for range 5 {
		long = append(long, 63)
		for range 63 {
			long = append(long, 'a')
		}
	}
	long = append(long, 0)

	return []struct {
		name  string
		req   []byte
		rcode int
	}{
		{"empty", nil, -1},
		{"short header", []byte{1, 2, 3}, -1},
		{"response", append(hdr(0x8000, 1, 0, 0, 0), question(www, 1, 1)...), -1},
		{"notify", packed(t, notify), mdns.RcodeNotImplemented},
		{"update", packed(t, update), mdns.RcodeNotImplemented},
		{"no question", hdr(0x0100, 0, 0, 0, 0), mdns.RcodeFormatError},
		{"two questions", append(append(hdr(0x0100, 2, 0, 0, 0), question(www, 1, 1)...), question(www, 28, 1)...), mdns.RcodeFormatError},
		{"answer in query", append(hdr(0x0100, 1, 1, 0, 0), question(www, 1, 1)...), mdns.RcodeFormatError},
		{"truncated name", append(hdr(0x0100, 1, 0, 0, 0), www[:6]...), mdns.RcodeFormatError},
		{"truncated type", append(hdr(0x0100, 1, 0, 0, 0), www...), mdns.RcodeFormatError},
		{"pointer in question", append(hdr(0x0100, 1, 0, 0, 0), question([]byte{3, 'w', 'w', 'w', 0xC0, 12}, 1, 1)...), mdns.RcodeFormatError},
		{"pointer loop", append(hdr(0x0100, 1, 0, 0, 0), question([]byte{0xC0, 12}, 1, 1)...), mdns.RcodeFormatError},
		{"label type 0x40", append(hdr(0x0100, 1, 0, 0, 0), question([]byte{0x41, 'x', 0}, 1, 1)...), mdns.RcodeFormatError},
		{"name over 255", append(hdr(0x0100, 1, 0, 0, 0), question(long, 1, 1)...), mdns.RcodeFormatError},
		{"truncated additional", append(append(hdr(0x0100, 1, 0, 0, 1), question(www, 1, 1)...), 0, 0, 41), mdns.RcodeFormatError},
		{"two OPT", twoOPT, mdns.RcodeFormatError},
		{"EDNS version 1", packed(t, badvers), mdns.RcodeBadVers},
		{"TSIG", packed(t, tsig), mdns.RcodeRefused},
		{"class CHAOS", packed(t, chaos), mdns.RcodeRefused},
		{"class ANY", append(hdr(0x0100, 1, 0, 0, 0), question(www, 1, 255)...), mdns.RcodeRefused},
		{"type 0", append(hdr(0x0100, 1, 0, 0, 0), question(www, 0, 1)...), mdns.RcodeFormatError},
		{"type OPT", append(hdr(0x0100, 1, 0, 0, 0), question(www, 41, 1)...), mdns.RcodeFormatError},
		{"MAILA", append(hdr(0x0100, 1, 0, 0, 0), question(www, mdns.TypeMAILA, 1)...), mdns.RcodeNotImplemented},
		{"AXFR external", packed(t, q("example.com.", mdns.TypeAXFR)), mdns.RcodeRefused},
	}
}

func TestBadInput(t *testing.T) {
	f := newFixture(t, noForwardConfig(), false, true, specObjects()...)
	for _, tc := range badInputs(t) {
		t.Run(tc.name, func(t *testing.T) {
			for _, tcp := range []bool{false, true} {
				resp := f.s.ServeRaw(f.ctx, tc.req, tcp)
				if tc.rcode < 0 {
					if resp != nil {
						t.Fatalf("tcp=%v: answered %x, want nothing", tcp, resp)
					}
					continue
				}
				r := new(mdns.Msg)
				if err := r.Unpack(resp); err != nil {
					t.Fatalf("tcp=%v: response does not parse: %v", tcp, err)
				}
				if r.Id != 0x1234 || !r.Response {
					t.Errorf("tcp=%v: id %x qr %v", tcp, r.Id, r.Response)
				}
				if r.Rcode != tc.rcode {
					t.Errorf("tcp=%v: rcode %s, want %s", tcp, mdns.RcodeToString[r.Rcode], mdns.RcodeToString[tc.rcode])
				}
				if !tcp && len(resp) > max(len(tc.req), 12)+optLen {
					t.Errorf("error response of %d bytes to a %d-byte query", len(resp), len(tc.req))
				}
			}
		})
	}
}

// noForwardConfig has no upstream at all: forwarding fails at once.
func noForwardConfig() Config {
	c := testConfig()
	c.Upstreams = nil
	c.ResolvConf = "/nonexistent/resolv.conf"
	return c
}

// bigHeadless returns a headless Service with n endpoints and one named
// port.
func bigHeadless(name string, n int) []runtime.Object {
	var eps []ep
	for i := range n {
		eps = append(eps, ep{ip: fmt.Sprintf("10.42.%d.%d", 100+i/250, 1+i%250)})
	}
	return []runtime.Object{
		service("prod", name, corev1.ClusterIPNone),
		slice("prod", name+"-1", name, discoveryv1.AddressTypeIPv4, eps, slicePort("p", corev1.ProtocolTCP, 7)),
	}
}

func TestSizeLimits(t *testing.T) {
	objs := append(bigHeadless("big", 100), bigHeadless("mid", 7)...)
	f := newFixture(t, noForwardConfig(), false, true, objs...)

	// 100 addresses: too big for 512 bytes, fit in 1232? No (1600+).
	r := f.ask("big.prod.svc.cluster.local.", mdns.TypeA)
	if !r.Truncated || len(r.Answer) != 0 || r.Rcode != 0 || !r.Authoritative {
		t.Fatalf("100 addresses over UDP: want empty TC, got tc=%v %d answers", r.Truncated, len(r.Answer))
	}
	r = f.ask("big.prod.svc.cluster.local.", mdns.TypeA, withEDNS(65000, false))
	if !r.Truncated || r.IsEdns0() == nil {
		t.Fatalf("EDNS 65000 is capped at 1232: tc=%v", r.Truncated)
	}
	m := q("big.prod.svc.cluster.local.", mdns.TypeA)
	if r = f.askRaw(packed(t, m), true); r.Truncated || len(r.Answer) != 100 {
		t.Fatalf("over TCP: tc=%v %d answers", r.Truncated, len(r.Answer))
	}
	// 7 SRV records (targets are never compressed) fit in 512 bytes
	// only without their glue: the
	// additional section goes, the answer stays, no TC (RFC 2181 9).
	r = f.ask("_p._tcp.mid.prod.svc.cluster.local.", mdns.TypeSRV)
	if r.Truncated || len(r.Answer) != 7 || len(r.Extra) != 0 {
		t.Fatalf("SRV without glue: tc=%v %d answers %d extra", r.Truncated, len(r.Answer), len(r.Extra))
	}
	r = f.ask("_p._tcp.mid.prod.svc.cluster.local.", mdns.TypeSRV, withEDNS(1232, false))
	if r.Truncated || len(r.Answer) != 7 || len(r.Extra) != 8 { // 7 A + OPT
		t.Fatalf("SRV with glue: tc=%v %d answers %d extra", r.Truncated, len(r.Answer), len(r.Extra))
	}
	// ANY is never an amplifier.
	req := packed(t, q("big.prod.svc.cluster.local.", mdns.TypeANY))
	resp := f.s.ServeRaw(f.ctx, req, false)
	if len(resp) > len(req)+24 {
		t.Fatalf("ANY: %d-byte answer to a %d-byte query", len(resp), len(req))
	}
}

// FuzzServeDNS feeds raw bytes to the query path: it must never panic, and
// whatever it sends must parse, answer the query's ID, and respect the UDP
// size limit.
func FuzzServeDNS(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	fx := newFixture(f, noForwardConfig(), true, true, append(specObjects(), bigHeadless("big", 60)...)...)
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, req []byte) {
		for _, tcp := range []bool{false, true} {
			resp := fx.s.ServeRaw(ctx, req, tcp)
			if resp == nil {
				continue
			}
			if len(req) < 2 || resp[0] != req[0] || resp[1] != req[1] {
				t.Fatalf("response ID does not match the query")
			}
			if resp[2]&flagQR == 0 {
				t.Fatalf("response without QR")
			}
			r := new(mdns.Msg)
			if err := r.Unpack(resp); err != nil {
				t.Fatalf("response does not parse: %v\nreq %x\nresp %x", err, req, resp)
			}
			if !tcp {
				limit := minUDP
				if o := r.IsEdns0(); o != nil {
					limit = 1232
				}
				if len(resp) > limit {
					t.Fatalf("%d-byte UDP response, limit %d", len(resp), limit)
				}
			}
		}
	})
}

func fuzzSeeds(t testing.TB) [][]byte {
	var out [][]byte
	for _, tc := range badInputs(t) {
		out = append(out, tc.req)
	}
	for _, x := range []struct {
		name  string
		qtype uint16
	}{
		{"kubernetes.default.svc.cluster.local.", mdns.TypeA},
		{"_pg._tcp.db.prod.svc.cluster.local.", mdns.TypeSRV},
		{"1.0.43.10.in-addr.arpa.", mdns.TypePTR},
		{"5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.3.4.d.f.ip6.arpa.", mdns.TypePTR},
		{"alias.prod.svc.cluster.local.", mdns.TypeA},
		{"big.prod.svc.cluster.local.", mdns.TypeA},
		{"10-42-1-10.prod.pod.cluster.local.", mdns.TypeA},
		{"dns-version.cluster.local.", mdns.TypeTXT},
		{"example.com.", mdns.TypeA},
		{"cluster.local.", mdns.TypeANY},
	} {
		m := q(x.name, x.qtype)
		out = append(out, packed(t, m))
		m.SetEdns0(4096, true)
		out = append(out, packed(t, m))
	}
	return out
}

// TestWriteFuzzSeeds regenerates testdata/fuzz/FuzzServeDNS when
// KNIT_WRITE_FUZZ_SEEDS=1.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("KNIT_WRITE_FUZZ_SEEDS") != "1" {
		t.Skip("set KNIT_WRITE_FUZZ_SEEDS=1 to regenerate the checked-in seeds")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzServeDNS")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, s := range fuzzSeeds(t) {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
