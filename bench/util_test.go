package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/cp"
)

// Helpers every benchmark of this package uses.

// copyExecutable copies src to dst with mode 0755: benchmarks run private
// copies of the binaries, so that a rebuild by someone else cannot swap
// them mid-run.
func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// median of v (0 for none); v is not reordered.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// procCPU is a process's user+system CPU time, all threads, from
// /proc/<pid>/stat (fields 14 and 15, in clock ticks).
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	// The command name (field 2) may hold spaces: count from after it.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	const clkTck = 100 // USER_HZ: 100 on every Linux architecture Go supports
	return time.Duration(utime+stime) * time.Second / clkTck, nil
}

// benchLab builds the control-plane binary (which also runs the anchor
// kube-proxy) and brings up a lab with opts working in <cache>/bench/<name>;
// it returns the lab, the binary's path, and that directory (for
// results.txt). The caller defers cl.Down().
func benchLab(ctx context.Context, b *testing.B, name string, opts lab.Options) (cl *lab.Cluster, cpBin, dir string) {
	b.Helper()
	cache, err := lab.CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	if cpBin, err = cp.Build(ctx, cache); err != nil {
		b.Fatal(err)
	}
	dir = filepath.Join(cache, "bench", name)
	opts.WorkDir = dir
	if cl, err = lab.Up(ctx, opts); err != nil {
		b.Fatal(err)
	}
	return cl, cpBin, dir
}

// procMemory returns the memory fields of /proc/<pid>/status (VmRSS,
// VmHWM = peak RSS, RssAnon, RssFile) in bytes.
func procMemory(pid int) map[string]int64 {
	out := map[string]int64{}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	for line := range strings.Lines(string(data)) {
		key, val, _ := strings.Cut(line, ":")
		switch key {
		case "VmRSS", "VmHWM", "RssAnon", "RssFile":
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(val), " kB"), 10, 64)
			out[key] = kb << 10
		}
	}
	return out
}

// parallel runs f(0..n-1) on workers goroutines and returns the first
// error.
func parallel(workers, n int, f func(i int) error) error {
	idx := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range idx {
				if err := f(i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	var err error
	for i := 0; i < n && err == nil; i++ {
		select {
		case idx <- i:
		case err = <-errs:
		}
	}
	close(idx)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}

// writerClient is an API client for writing a benchmark's thousands of
// objects: protobuf, and a rate limit far above client-go's default.
func writerClient(b *testing.B, cl *lab.Cluster) kubernetes.Interface {
	b.Helper()
	cfg := rest.CopyConfig(cl.Config)
	cfg.QPS, cfg.Burst = 5000, 10000
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return client
}

// proxyBaseline counts the Services node n's knit proxy programs before a
// proxy benchmark writes its own (kubernetes, and kube-dns), then stops
// every agent and deletes its table, so that each side starts from scratch.
func proxyBaseline(ctx context.Context, b *testing.B, cl *lab.Cluster, n *lab.Node) int {
	b.Helper()
	base, err := proxyMapCount(ctx, n, "inet", "knit-proxy", "service-ips-v4")
	if err != nil {
		b.Fatal(err)
	}
	for _, nd := range cl.Nodes {
		nd.StopAgent()
		// The agent leaves its table on exit.
		_, _ = nd.Exec(ctx, "nft", "delete", "table", "inet", "knit-proxy")
	}
	return base
}
