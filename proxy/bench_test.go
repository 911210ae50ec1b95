package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/knftables"
)

// Benchmarks of the render and apply path at the scale of the targets
// (10,000 Services x 10 endpoints; one more Service programmed in <= 50 ms,
// full sync <= 2 s). The "fake" variants measure knit's own work (render,
// diff, transaction building) against knftables' fake, whose Run copies the
// whole table and so adds a cost of its own; the "nft" variants apply to the
// real nft in the sandbox's network namespace.
//
//	go test ./proxy -run XXX -bench . -benchtime 3x

const (
	benchServices  = 10000
	benchEndpoints = 10
)

// benchState builds the state directly (no informers): 10,000 ClusterIP
// Services with 10 endpoints each, every tenth also a NodePort.
func benchState(tb testing.TB) *state {
	st := &state{
		services:  map[types.NamespacedName]*serviceInfo{},
		endpoints: map[types.NamespacedName]portEndpoints{},
		topo:      topology{node: thisNode, zone: "zone-a"},
	}
	p := &Proxier{cfg: testConfig()}
	_, st.static = p.view()
	for i := range benchServices {
		name := fmt.Sprintf("svc-%d", i)
		s := service("bench", name, fmt.Sprintf("10.43.%d.%d", i/250, i%250+1))
		if i%10 == 0 {
			withNodePort(int32(30000 + i/10))(s)
		}
		nn := types.NamespacedName{Namespace: "bench", Name: name}
		st.services[nn] = convertService(s, nil, quiet)
		sl := slice("bench", name, name+"-1", 8080, eps(benchEndpoints, fmt.Sprintf("10.%d.%d", 44+i/250, i%250), otherNode))
		st.endpoints[nn] = mergeSlices(map[string]*sliceInfo{"s": convertSlice(sl, thisNode, quiet)})
	}
	return st
}

// renderOnly stands in for the kernel: it serializes each transaction (as
// knftables does before running nft, or as batchingNFT writes a full sync's
// elements) and drops it. knftables' fake is no
// use at this scale: it inserts each element with a linear search, which
// makes a 120,000-element sync take a minute of the fake's own time.
type renderOnly struct {
	knftables.Interface
	bytes int
}

func (r *renderOnly) Run(_ context.Context, tx *knftables.Transaction) error {
	r.bytes = len(tx.String())
	return nil
}

func (r *renderOnly) List(context.Context, string) ([]string, error) { return nil, nil }

// runBulk writes a full sync's text as batchingNFT does, and drops it.
func (r *renderOnly) runBulk(_ context.Context, head *knftables.Transaction, elems []*element, tail *knftables.Transaction) error {
	var c countingWriter
	writeBulk(&c, head.String(), elems, tail.String())
	r.bytes = c.n
	return nil
}

type countingWriter struct{ n int }

func (c *countingWriter) WriteString(s string) (int, error) { c.n += len(s); return len(s), nil }
func (c *countingWriter) WriteByte(byte) error              { c.n++; return nil }

func benchNFT(b *testing.B, kind string) (nft, lister knftables.Interface) {
	switch kind {
	case "render":
		return &renderOnly{Interface: knftables.NewFake(knftables.InetFamily, tableName)}, nil
	case "fake":
		return knftables.NewFake(knftables.InetFamily, tableName), nil
	}
	requireSandbox(b)
	nft, lister, err := newNFT()
	if err != nil {
		b.Fatal(err)
	}

	// Start from an empty table.
	tx := nft.NewTransaction()
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	if err := nft.Run(context.Background(), tx); err != nil {
		b.Fatal(err)
	}
	return nft, lister
}

func BenchmarkFullSync(b *testing.B) {
	for _, kind := range []string{"render", "nft"} {
		b.Run(kind, func(b *testing.B) {
			st := benchState(b)
			nft, lister := benchNFT(b, kind)
			be := newNFTBackend(nft, slog.New(slog.DiscardHandler))
			be.lister = lister
			b.ResetTimer()
			for b.Loop() {
				if _, err := be.sync(context.Background(), st, nil, true); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(be.applied)), "elements")
		})
	}
}

// syncer is what the benchmarks drive: the nft or the iptables backend.
type syncer interface {
	sync(ctx context.Context, st *state, changed map[types.NamespacedName]bool, full bool) (syncResult, error)
}

// benchOneNewService syncs st in full, then times, per iteration, the
// partial sync of one new Service with benchEndpoints endpoints; it removes
// the Service again untimed, so that every iteration adds. It returns the
// slowest partial sync.
func benchOneNewService(b *testing.B, be syncer, st *state) time.Duration {
	b.Helper()
	if _, err := be.sync(context.Background(), st, nil, true); err != nil {
		b.Fatal(err)
	}
	i := 0
	var worst time.Duration
	b.ResetTimer()
	for b.Loop() {
		name := types.NamespacedName{Namespace: "new", Name: fmt.Sprintf("n%d", i)}
		st.services[name] = convertService(service("new", name.Name, netip.AddrFrom4([4]byte{10, 43, 200, byte(i % 250)}).String()), nil, quiet)
		sl := slice("new", name.Name, name.Name+"-1", 8080, eps(benchEndpoints, fmt.Sprintf("10.99.%d", i%250), otherNode))
		st.endpoints[name] = mergeSlices(map[string]*sliceInfo{"s": convertSlice(sl, thisNode, quiet)})
		start := time.Now()
		if _, err := be.sync(context.Background(), st, map[types.NamespacedName]bool{name: true}, false); err != nil {
			b.Fatal(err)
		}
		worst = max(worst, time.Since(start))
		b.StopTimer()
		delete(st.services, name)
		delete(st.endpoints, name)
		if _, err := be.sync(context.Background(), st, map[types.NamespacedName]bool{name: true}, false); err != nil {
			b.Fatal(err)
		}
		i++
		b.StartTimer()
	}
	return worst
}

func BenchmarkPartialSyncOneNewService(b *testing.B) {
	for _, kind := range []string{"render", "fake", "nft"} {
		b.Run(kind, func(b *testing.B) {
			st := benchState(b)
			nft, lister := benchNFT(b, kind)
			be := newNFTBackend(nft, slog.New(slog.DiscardHandler))
			be.lister = lister
			worst := benchOneNewService(b, be, st)
			b.ReportMetric(float64(worst.Microseconds())/1000, "worst-ms")
		})
	}
}
