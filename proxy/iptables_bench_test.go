package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"testing"
)

// Benchmarks of the iptables backend: "render" measures knit's own work
// (render, diff, batch text) with a kernel that drops the batch; "legacy"
// and "nft" apply to the real iptables-legacy-restore and
// iptables-nft-restore in the sandbox's network namespace. The scale is
// benchServices (10,000) Services x 10 endpoints, or
// KNIT_BENCH_IPT_SERVICES for the real variants:
//
//	go test ./proxy -run XXX -bench IPTables -benchtime 1x

// dropIPT is an iptTables that keeps nothing but the size of the last batch.
type dropIPT struct{ bytes int }

func (d *dropIPT) restore(_ context.Context, data []byte) error { d.bytes = len(data); return nil }
func (d *dropIPT) ensureJumps([]iptJump) error                  { return nil }
func (d *dropIPT) listChains(string) ([]string, error)          { return nil, nil }
func (d *dropIPT) chainExists(string, string) (bool, error)     { return true, nil }
func (d *dropIPT) randomFully() bool                            { return true }

// benchIPT returns the backend for kind and the number of Services to use.
func benchIPT(b *testing.B, kind string) (*iptBackend, int) {
	if kind == "render" {
		return newIPTBackend(map[family]iptTables{v4: &dropIPT{}, v6: &dropIPT{}}, slog.New(slog.DiscardHandler)), benchServices
	}
	n := benchServices
	if v := os.Getenv("KNIT_BENCH_IPT_SERVICES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 || n > benchServices {
			b.Fatalf("KNIT_BENCH_IPT_SERVICES=%q: want 1..%d", v, benchServices)
		}
	}
	return realIPT(b, kind), n
}

// benchIPTState is benchState cut to n Services.
func benchIPTState(tb testing.TB, n int) *state {
	st := benchState(tb)
	for name := range st.services {
		var i int
		if _, err := fmt.Sscanf(name.Name, "svc-%d", &i); err == nil && i >= n {
			delete(st.services, name)
			delete(st.endpoints, name)
		}
	}
	return st
}

func BenchmarkIPTablesFullSync(b *testing.B) {
	for _, kind := range []string{"render", iptLegacy, iptNFT} {
		b.Run(kind, func(b *testing.B) {
			be, n := benchIPT(b, kind)
			st := benchIPTState(b, n)
			var res syncResult
			b.ResetTimer()
			for b.Loop() {
				var err error
				if res, err = be.sync(context.Background(), st, nil, true); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(n), "services")
			b.ReportMetric(float64(res.rules), "rules")
		})
	}
}

func BenchmarkIPTablesPartialSyncOneNewService(b *testing.B) {
	for _, kind := range []string{"render", iptLegacy, iptNFT} {
		b.Run(kind, func(b *testing.B) {
			be, n := benchIPT(b, kind)
			st := benchIPTState(b, n)
			worst := benchOneNewService(b, be, st)
			b.ReportMetric(float64(n), "services")
			b.ReportMetric(float64(worst.Microseconds())/1000, "worst-ms")
		})
	}
}
