package plugin

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

// buildPlugin compiles cmd/knit-cni (the plugin without the rest of knit)
// as <dir>/knit, the way a node would have it in its CNI bin dir.
func buildPlugin(tb testing.TB) string {
	tb.Helper()
	dir := tb.TempDir()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goBin, "build", "-o", filepath.Join(dir, "knit"), "knit.dev/knit/cni/cmd/knit-cni")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("build plugin: %v\n%s", err, out)
	}
	return dir
}

// latencies collects per-call durations and reports percentiles.
type latencies struct {
	mu sync.Mutex
	d  map[string][]time.Duration
}

func (l *latencies) add(name string, d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d == nil {
		l.d = map[string][]time.Duration{}
	}
	l.d[name] = append(l.d[name], d)
}

func (l *latencies) report(b *testing.B) {
	for name, ds := range l.d {
		slices.Sort(ds)
		pct := func(p float64) float64 {
			return float64(ds[int(float64(len(ds)-1)*p)].Microseconds()) / 1000
		}
		b.ReportMetric(pct(0.5), name+"-p50-ms")
		b.ReportMetric(pct(0.99), name+"-p99-ms")
	}
	b.ReportMetric(0, "ns/op")
}

// BenchmarkLibcni measures ADD and DEL through libcni, as a container
// runtime calls the plugin: the compiled plugin binary, a dual-stack node,
// pods in their own network namespaces, serially and 16 at a time.
//
//	go test ./cni/plugin -run '^$' -bench Libcni -benchtime 200x
func BenchmarkLibcni(b *testing.B) {
	n := newNode(b, "10.42.1.0/24", "fd42:0:0:1::/64")
	binDir := buildPlugin(b)
	conflist, err := libcni.ConfListFromBytes([]byte(fmt.Sprintf(`{
		"cniVersion": "1.1.0", "name": "knit",
		"plugins": [{"type": "knit", "runDir": %q, "stateDir": %q, "capabilities": {"portMappings": true}}]
	}`, n.runDir, n.stateDir)))
	if err != nil {
		b.Fatal(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{binDir}, b.TempDir(), nil)
	ctx := context.Background()

	for _, parallel := range []int{1, 16} {
		b.Run(fmt.Sprintf("parallel-%d", parallel), func(b *testing.B) {
			pods := make([]*pod, parallel)
			for i := range pods {
				pods[i] = newPod(b, fmt.Sprint("bench-", i))
			}
			var lat latencies
			var wg sync.WaitGroup
			b.ResetTimer()
			for w, p := range pods {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < b.N; i += parallel {
						rt := &libcni.RuntimeConf{ContainerID: fmt.Sprintf("bench-%d-%d", parallel, i), NetNS: p.ns.Path(), IfName: "eth0",
							Args: [][2]string{{"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", fmt.Sprint("bench-", i)}, {"K8S_POD_UID", fmt.Sprint("uid-", i)}}}
						start := time.Now()
						if _, err := cni.AddNetworkList(ctx, conflist, rt); err != nil {
							b.Error(err)
							return
						}
						lat.add("add", time.Since(start))
						start = time.Now()
						if err := cni.DelNetworkList(ctx, conflist, rt); err != nil {
							b.Error(err)
							return
						}
						lat.add("del", time.Since(start))
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			lat.report(b)
		})
	}
}

// BenchmarkInProcess measures the plugin's own work for ADD and DEL,
// without process start-up: the dispatcher called in this process.
func BenchmarkInProcess(b *testing.B) {
	n := newNode(b, "10.42.1.0/24", "fd42:0:0:1::/64")
	p := newPod(b, "inproc")
	conf := n.conf("1.1.0", nil)
	var lat latencies
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		env := p.env()
		env["CNI_CONTAINERID"] = fmt.Sprint("inproc-", i)
		start := time.Now()
		if out, code := n.call("ADD", conf, env); code != 0 {
			b.Fatal(out)
		}
		lat.add("add", time.Since(start))
		start = time.Now()
		if out, code := n.call("DEL", conf, env); code != 0 {
			b.Fatal(out)
		}
		lat.add("del", time.Since(start))
	}
	b.StopTimer()
	lat.report(b)
}
