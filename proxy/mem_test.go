package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"runtime/pprof"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// BenchmarkMemory measures the live heap that the proxy keeps for 10,000
// Services x 10 endpoints (every tenth also a NodePort), built the way the
// agent builds it: Services and EndpointSlices converted by the event
// handlers' functions into the trackers, checked out into the state, then
// one full sync. Nothing is timed; it reports, after a GC each:
//
//	state-MB     trackers and state (converted Services, slices, endpoints)
//	backend-MB   what the backend keeps after the full sync (renders,
//	             applied elements)
//	sync-alloc-MB  bytes allocated by the full sync (garbage and kept)
//	first-sync-peak-MB, resync-peak-MB  the most heap (live or not yet
//	             collected; above where the state began) during the first
//	             full sync and a second one, sampled every millisecond with
//	             the agent's GOGC (defaultGCPercent 25 in agent/memory.go):
//	             what the process's RSS grows to
//	partial-alloc-KB  bytes allocated by one partial sync of one Service
//
// The informer cache's objects are not included (they live in the shared
// cache, slimmed by cluster's transform). "render" stands in for the kernel
// (see renderOnly); "nft" applies to the real nft in the sandbox.
//
//	go test ./proxy -run XXX -bench Memory -benchtime 1x
//
// With KNIT_PROXY_HEAPPROFILE=<file> (and -memprofilerate 512 for detail)
// it writes a heap profile after the full sync.
func BenchmarkMemory(b *testing.B) {
	for _, kind := range []string{"render", "nft"} {
		b.Run(kind, func(b *testing.B) {
			for b.Loop() {
				measureMemory(b, kind)
			}
		})
	}
}

func measureMemory(b *testing.B, kind string) {
	heap := func() (live, total uint64) {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc, ms.TotalAlloc
	}
	mb := func(n uint64) float64 { return float64(n) / (1 << 20) }

	nft, lister := benchNFT(b, kind)
	p := &Proxier{cfg: testConfig()}
	h0, _ := heap()

	svcs := newServiceTracker()
	epts := newEndpointTracker(time.Now())
	for i := range benchServices {
		ns, name := memNames(i)
		s := service(ns, name, fmt.Sprintf("10.43.%d.%d", i/250, i%250+1))
		if i%10 == 0 {
			withNodePort(int32(30000 + i/10))(s)
		}
		nn := types.NamespacedName{Namespace: ns, Name: name}
		svcs.update(nn, nil, convertService(s, p.cfg.LocalServiceIPs, quiet))
		sl := slice(ns, name, name+"-x7k2p", 8080, eps(benchEndpoints, fmt.Sprintf("10.%d.%d", 44+i/250, i%250), otherNode))
		epts.update(nn, sl.Name, convertSlice(sl, thisNode, quiet), time.Time{})
	}
	st := &state{
		services:  map[types.NamespacedName]*serviceInfo{},
		endpoints: map[types.NamespacedName]portEndpoints{},
	}
	svcs.checkout(st.services)
	epts.checkout(st.endpoints)
	st.topo, st.static = p.view()
	h1, t1 := heap()

	be := newNFTBackend(nft, slog.New(slog.DiscardHandler))
	be.lister = lister
	ctx := context.Background()
	fullSync := func() {
		if _, err := be.sync(ctx, st, nil, true); err != nil {
			b.Fatal(err)
		}
	}
	peak1 := peakHeap(fullSync)
	h2, t2 := heap()
	peak2 := peakHeap(fullSync) // the periodic resync: a backend to replace
	heap()
	if path := os.Getenv("KNIT_PROXY_HEAPPROFILE"); path != "" {
		// What is live now, by allocation site: go tool pprof -sample_index=inuse_space
		if err := writeHeapProfile(path); err != nil {
			b.Fatal(err)
		}
	}

	// One partial sync: a Service's endpoints change.
	ns, name := memNames(7)
	nn := types.NamespacedName{Namespace: ns, Name: name}
	sl := slice(ns, name, name+"-x7k2p", 8080, eps(benchEndpoints, "10.99.7", otherNode))
	epts.update(nn, sl.Name, convertSlice(sl, thisNode, quiet), time.Time{})
	changed, _ := epts.checkout(st.endpoints)
	_, t3 := heap()
	if _, err := be.sync(ctx, st, changed, false); err != nil {
		b.Fatal(err)
	}
	_, t4 := heap()

	b.ReportMetric(mb(h1-h0), "state-MB")
	b.ReportMetric(mb(h2-h1), "backend-MB")
	b.ReportMetric(mb(t2-t1), "sync-alloc-MB")
	b.ReportMetric(mb(peak1-h0), "first-sync-peak-MB")
	b.ReportMetric(mb(peak2-h0), "resync-peak-MB")
	b.ReportMetric(float64(t4-t3)/1024, "partial-alloc-KB")
	runtime.KeepAlive(svcs)
	runtime.KeepAlive(epts)
	runtime.KeepAlive(be)
}

// memNames are names as a cluster has them: 100 namespaces, Services named
// like Deployments.
func memNames(i int) (ns, name string) {
	return fmt.Sprintf("team-%02d-prod", i%100), fmt.Sprintf("checkout-api-%05d", i)
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// peakHeap runs f with GOGC 25 and returns the most heap it saw in use
// (objects, live or not yet collected), sampled every millisecond.
func peakHeap(f func()) uint64 {
	defer debug.SetGCPercent(debug.SetGCPercent(25))
	runtime.GC()
	stop, done := make(chan struct{}), make(chan uint64)
	go func() {
		sample := []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		var peak uint64
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			rtmetrics.Read(sample)
			peak = max(peak, sample[0].Value.Uint64())
			select {
			case <-stop:
				done <- peak
				return
			case <-t.C:
			}
		}
	}()
	f()
	close(stop)
	return <-done
}
