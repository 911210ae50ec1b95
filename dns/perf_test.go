package dns

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"
)

// TestServeForPerf serves the 1,000-Service benchmark cluster on
// KNIT_DNS_PERF_ADDR (e.g. 127.0.0.1:15353) for KNIT_DNS_PERF_SECONDS, so
// that dnsperf can be pointed at the real UDP path. Skipped unless set.
func TestServeForPerf(t *testing.T) {
	addr := os.Getenv("KNIT_DNS_PERF_ADDR")
	if addr == "" {
		t.Skip("set KNIT_DNS_PERF_ADDR to serve for dnsperf")
	}
	secs, _ := time.ParseDuration(os.Getenv("KNIT_DNS_PERF_SECONDS") + "s")
	if secs == 0 {
		secs = 30 * time.Second
	}
	cfg := noForwardConfig()
	cfg.ListenAddrs = []netip.AddrPort{netip.MustParseAddrPort(addr)}
	f := newFixture(t, cfg, false, false, benchObjects()...)
	ctx, cancel := context.WithTimeout(f.ctx, secs)
	defer cancel()
	f.factory.Start(ctx.Done())
	if err := f.s.Run(ctx); err != nil {
		t.Fatal(err)
	}
}
