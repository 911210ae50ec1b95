package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"debug/elf"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/anchors"
	"knit.dev/knit/lab/cp"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/lab/sandbox"
)

// The cluster of the memory benchmark (DESIGN.md, "Targets": 1,000 Services
// / 10,000 endpoints / 1,000 Pods), spread over memNamespaces namespaces:
//
//   - memServices Services of one TCP port ("http" 80 -> 8080), every
//     memNodePortEvery-th of type NodePort, no selector; each has one
//     EndpointSlice of memEndpoints ready endpoints written by the
//     benchmark, as a controller writes them (nodeName, targetRef to a Pod
//     of the Service's namespace).
//   - memPods Pods with a realistic spec (one container with ports,
//     resources, env and a readiness probe; the API server adds the service
//     account volume) and status (Running, Ready, a container status).
//     memRealPods of them run for real on node1 (sim kubelet: netns, CNI
//     ADD, echo workload) and back Service 0; the others are bound to
//     memFakeNodes Node objects that have no kubelet, their status written
//     by the benchmark, so that 1,000 Pods cost API objects rather than
//     1,000 network namespaces and processes.
//   - memIngresses Ingresses of class knit, one host and path each, to
//     Services 0..memIngresses-1; the first memTLS with a TLS Secret.
const (
	memServices      = 1000
	memEndpoints     = 10
	memPods          = 1000
	memRealPods      = 10
	memNamespaces    = 20
	memFakeNodes     = 20
	memNodePortEvery = 10
	memIngresses     = 100
	memTLS           = 10
	memWriters       = 16
	memManagedBy     = "bench.knit.dev"
)

// How long a process must have been synced before its memory is read, and
// how it is read: memSamples readings memSampleEvery apart, of which the
// table shows the median (and the maximum); the peak is the kernel's VmHWM
// since process start, the initial list included.
const (
	memSettle      = 30 * time.Second
	memSamples     = 20
	memSampleEvery = time.Second
	memSyncTimeout = 5 * time.Minute
	memTargetMiB   = 64
)

// memKnitVariants are extra agent flags the loaded phase measures knit with
// too, one restart each (the anchors are not restarted).
var memKnitVariants = [][]string{
	{"--release-startup-pages=false"},
	{"--gc-percent=50"},
	{"--gc-percent=100"},
	{"--gc-percent=100", "--release-startup-pages=false"},
}

// memProc is one process whose memory is measured.
type memProc struct {
	name   string
	pid    func() int
	metric string // its /metrics URL ("" if it has none)

	readings map[string]*memReading // by phase
}

// reading returns the process's reading of phase, creating it.
func (p *memProc) reading(phase string) *memReading {
	if p.readings == nil {
		p.readings = map[string]*memReading{}
	}
	r := p.readings[phase]
	if r == nil {
		r = &memReading{}
		p.readings[phase] = r
	}
	return r
}

// memReading is one phase's memory of a process.
type memReading struct {
	rss, rssMax, hwm   int64 // bytes: median and maximum of the samples, peak since start
	anon, file         int64 // RssAnon, RssFile of the last sample
	text, rodata, data int64 // resident pages of the binary's mappings (smaps)
	heapInuse, heapSys int64 // Go runtime, from /metrics (0: not exported)
	stacks, goSys      int64
	synced             time.Duration // process start to synced
	cpuSynced, cpuEnd  time.Duration // CPU time (user+system) when synced, at the last reading
}

// BenchmarkMemory measures the memory of the knit agent with every
// component on, serving the cluster above, against what it replaces on a
// node: kube-proxy (nftables mode, built alone from the control plane's
// module, cp.BuildKubeProxy) plus CoreDNS 1.15.0 (lab/anchors, kubeadm's
// default Corefile as in BenchmarkDNS), all three reading the same API
// server in one lab:
//
//	sandbox root: control plane (lab/cp) on 198.18.0.254; memFakeNodes Node
//	              objects without a netns (their Pods are objects only)
//	  netns node1: knit agent, all components (cni, overlay, proxy, dns, ingress)
//	               + sim kubelet running memRealPods echo pods
//	  netns node2: kube-proxy --proxy-mode=nftables, CoreDNS (knit agent stopped)
//
// Two phases: "empty" (the lab's own few objects) and "loaded" (all of the
// above, created before the three processes are restarted, so that each
// lists everything at start as after a node reboot). A process counts as
// synced when knit's /readyz answers 200, its service-ips map holds every
// Service, its DNS answers every Service name with the ClusterIP and a
// request through its ingress to Service 0 gets the echo pod's answer;
// kube-proxy when its service-ips map holds every Service; CoreDNS when it
// answers every name. Memory is then read after memSettle. In the loaded
// phase knit is then restarted alone with each of memKnitVariants and
// measured the same way. The knit agent runs with --pprof; its heap profile
// after the loaded phase is kept as knit-heap.pprof. Missing the target is
// reported, not failed.
//
//	go test -run '^$' -bench BenchmarkMemory -benchtime 1x -timeout 30m ./bench/
func BenchmarkMemory(b *testing.B) {
	sandbox.Require(b)
	ctx := context.Background()
	began := time.Now()
	cacheDir, err := lab.CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	dir := filepath.Join(cacheDir, "bench", "memory")
	if err := os.RemoveAll(dir); err != nil {
		b.Fatal(err)
	}
	bins := memBuild(ctx, b, cacheDir, dir)
	built := time.Since(began)

	cl, err := lab.Up(ctx, lab.Options{
		Nodes:      2,
		WorkDir:    filepath.Join(dir, "lab"),
		CacheDir:   cacheDir,
		KnitBinary: bins["knit"],
		AgentArgs:  []string{"--pprof"},
		Log:        slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		b.Fatalf("lab up: %v", err)
	}
	defer cl.Down()
	n1, n2 := cl.Nodes[0], cl.Nodes[1]
	n2.StopAgent() // node2 hosts the anchors

	client := writerClient(b, cl)

	s := &memSetup{cl: cl, client: client, node1: n1, node2: n2, bins: bins, dir: dir}
	defer s.stopAnchors()
	procs := s.procs()

	// Phase "empty": the lab's own objects only (2 Services, 2 Nodes).
	want, err := s.wantDNS(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if err := s.run(ctx, b, procs, want, 0, "empty", nil, true); err != nil {
		b.Fatal(err)
	}
	emptyDone := time.Since(began)

	// Phase "loaded": the load, then all three restarted; then knit alone
	// again with each of memKnitVariants.
	t0 := time.Now()
	if err := s.createLoad(ctx); err != nil {
		b.Fatal(err)
	}
	created := time.Since(t0)
	if want, err = s.wantDNS(ctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	phases := []string{"empty", "loaded"}
	if err := s.run(ctx, b, procs, want, memIngresses, "loaded", nil, true); err != nil {
		b.Fatal(err)
	}
	if err := s.saveHeapProfile(filepath.Join(dir, "knit-heap.pprof")); err != nil {
		b.Logf("heap profile: %v", err)
	}
	for _, v := range memKnitVariants {
		phase := "loaded " + strings.Join(v, " ")
		if err := s.run(ctx, b, procs, want, memIngresses, phase, v, false); err != nil {
			b.Fatal(err)
		}
		phases = append(phases, phase)
	}
	b.StopTimer()

	table := memReport(b, procs, phases, bins, created)
	table += fmt.Sprintf("load average %s; wall %v (builds %v, empty phase %v, objects %v)\n",
		dnsLoadAvg(), time.Since(began).Round(time.Second), built.Round(time.Second),
		(emptyDone - built).Round(time.Second), created.Round(time.Second))
	fmt.Print(table)
	if err := os.WriteFile(filepath.Join(dir, "results.txt"), []byte(table), 0o644); err != nil {
		b.Error(err)
	}
}

// memBuild builds knit and knit-cni (lab.BuildKnit: static and stripped,
// as the image ships them), kube-proxy and CoreDNS, or finds them up to
// date, and copies them into dir/bin.
func memBuild(ctx context.Context, b *testing.B, cacheDir, dir string) map[string]string {
	b.Helper()
	knit, err := lab.BuildKnit(ctx, cacheDir)
	if err != nil {
		b.Fatal(err)
	}
	kubeProxy, err := cp.BuildKubeProxy(ctx, cacheDir)
	if err != nil {
		b.Fatal(err)
	}
	coredns, err := anchors.Build(ctx, cacheDir)
	if err != nil {
		b.Fatalf("%v\n(with a cold module cache, run `go mod download` in lab/anchors/coredns outside the sandbox first)", err)
	}
	binDir := filepath.Join(dir, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		b.Fatal(err)
	}
	out := map[string]string{}
	for name, src := range map[string]string{"knit": knit, "knit-cni": knit + "-cni", "kube-proxy": kubeProxy, "coredns": coredns} {
		dst := filepath.Join(binDir, name)
		if err := copyExecutable(src, dst); err != nil {
			b.Fatal(err)
		}
		out[name] = dst
	}
	return out
}

// memSetup is the lab and what runs in it.
type memSetup struct {
	cl           *lab.Cluster
	client       kubernetes.Interface
	node1, node2 *lab.Node
	bins         map[string]string
	dir          string

	kubeProxy, coredns *dnsServer
}

func (s *memSetup) procs() []*memProc {
	return []*memProc{
		{name: "knit agent", pid: s.node1.AgentPID, metric: s.node1.HealthURL() + "/metrics"},
		{name: "kube-proxy", pid: func() int { return s.kubeProxy.pid() },
			metric: "http://" + s.node2.IP + ":10249/metrics"},
		{name: "CoreDNS", pid: func() int { return s.coredns.pid() }},
	}
}

// run (re)starts knit with the extra agent flags knitArgs and, with
// anchors, kube-proxy and CoreDNS; waits until each has synced; lets them
// settle and reads their memory into their readings of phase. ingresses is
// the number of ingress routes knit must serve.
func (s *memSetup) run(ctx context.Context, b *testing.B, procs []*memProc, want dnsWant, ingresses int,
	phase string, knitArgs []string, anchors bool) error {
	s.node1.StopAgent()
	if anchors {
		s.stopAnchors()
	}
	// Every Service but kube-dns has endpoints and so an element in both
	// proxies' service-ips maps (kube-dns has no Pods here; knit answers
	// its IP itself).
	services := len(want) - 1
	start := time.Now()
	if err := s.node1.StartAgentWith(knitArgs...); err != nil {
		return err
	}
	if !anchors {
		procs = procs[:1]
	} else if err := s.startAnchors(); err != nil {
		return err
	}
	pick := func(p *memProc) *memReading { return p.reading(phase) }

	knitDNS := &dnsServer{name: "knit", addr: lab.ClusterDNS, done: make(chan struct{}), log: filepath.Join(s.node1.Dir, "agent.log")}
	waits := []func() error{
		func() error {
			if err := s.node1.WaitAgentReady(ctx, memSyncTimeout); err != nil {
				return err
			}
			if err := memWaitMap(ctx, s.node1, "inet", "knit-proxy", "service-ips-v4", services); err != nil {
				return fmt.Errorf("knit: %w", err)
			}
			if err := dnsWaitAnswers(ctx, s.node1.Netns(), knitDNS, want, memSyncTimeout); err != nil {
				return err
			}
			if err := s.waitIngress(ctx, ingresses); err != nil {
				return err
			}
			pick(procs[0]).synced = time.Since(start)
			pick(procs[0]).cpuSynced, _ = procCPU(procs[0].pid())
			return nil
		},
	}
	if anchors {
		waits = append(waits, func() error {
			if err := memWaitMap(ctx, s.node2, "ip", "kube-proxy", "service-ips", services); err != nil {
				return fmt.Errorf("kube-proxy: %w (log %s)", err, s.kubeProxy.log)
			}
			pick(procs[1]).synced = time.Since(start)
			pick(procs[1]).cpuSynced, _ = procCPU(procs[1].pid())
			return nil
		}, func() error {
			if err := dnsWaitAnswers(ctx, s.node2.Netns(), s.coredns, want, memSyncTimeout); err != nil {
				return err
			}
			pick(procs[2]).synced = time.Since(start)
			pick(procs[2]).cpuSynced, _ = procCPU(procs[2].pid())
			return nil
		})
	}
	errs := make([]error, len(waits))
	var wg sync.WaitGroup
	for i, w := range waits {
		wg.Go(func() { errs[i] = w() })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	b.Logf("all synced after %v; settling %v", time.Since(start).Round(time.Millisecond), memSettle)
	time.Sleep(memSettle)

	samples := make([][]int64, len(procs))
	for range memSamples {
		for i, p := range procs {
			samples[i] = append(samples[i], procMemory(p.pid())["VmRSS"])
		}
		time.Sleep(memSampleEvery)
	}
	for i, p := range procs {
		r := pick(p)
		slices.Sort(samples[i])
		r.rss, r.rssMax = samples[i][len(samples[i])/2], samples[i][len(samples[i])-1]
		st := procMemory(p.pid())
		r.hwm, r.anon, r.file = st["VmHWM"], st["RssAnon"], st["RssFile"]
		r.cpuEnd, _ = procCPU(p.pid())
		r.text, r.rodata, r.data = memBinaryResident(p.pid())
		if p.metric != "" {
			m := memMetrics(p.metric)
			r.heapInuse, r.heapSys = m["go_memstats_heap_inuse_bytes"], m["go_memstats_heap_sys_bytes"]
			r.stacks, r.goSys = m["go_memstats_stack_inuse_bytes"], m["go_memstats_sys_bytes"]
		}
	}
	return nil
}

// startAnchors starts kube-proxy and CoreDNS in node2.
func (s *memSetup) startAnchors() error {
	var err error
	if s.kubeProxy, err = dnsStart(s.dir, "kube-proxy", "ip", "netns", "exec", s.node2.Name, s.bins["kube-proxy"],
		"--proxy-mode=nftables",
		"--kubeconfig", s.cl.Kubeconfig(),
		"--hostname-override", s.node2.Name,
		"--cluster-cidr", lab.ClusterCIDR,
		"--conntrack-max-per-core=0",
		"--metrics-bind-address", s.node2.IP+":10249",
		"--healthz-bind-address", s.node2.IP+":10256",
		"--v=1"); err != nil {
		return err
	}
	corefile := filepath.Join(s.dir, "Corefile")
	if err := os.WriteFile(corefile, fmt.Appendf(nil, dnsCorefile, s.node2.IP, s.node2.IP, s.cl.Kubeconfig(), lab.UpstreamAddr), 0o644); err != nil {
		return err
	}
	if s.coredns, err = dnsStart(s.dir, "coredns", "ip", "netns", "exec", s.node2.Name, s.bins["coredns"], "-conf", corefile); err != nil {
		return err
	}
	s.kubeProxy.addr, s.coredns.addr = s.node2.IP, s.node2.IP
	return nil
}

func (s *memSetup) stopAnchors() {
	if s.kubeProxy != nil {
		s.kubeProxy.stop()
		s.coredns.stop()
		s.kubeProxy, s.coredns = nil, nil
	}
}

// waitIngress waits until knit's ingress serves at least routes routes and,
// when it serves any, a request for Service 0's host reaches an echo pod.
func (s *memSetup) waitIngress(ctx context.Context, routes int) error {
	url := s.node1.HealthURL() + "/metrics"
	client := &http.Client{Timeout: 2 * time.Second}
	var last string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, memSyncTimeout, true, func(ctx context.Context) (bool, error) {
		if n := memMetrics(url)["knit_ingress_routes"]; n < int64(routes) {
			last = fmt.Sprintf("%d of %d routes", n, routes)
			return false, nil
		}
		if routes == 0 {
			return true, nil
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.node1.IP+"/", nil)
		req.Host = memHost(0)
		resp, err := client.Do(req)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			last = fmt.Sprintf("GET %s: %s %s", memHost(0), resp.Status, body)
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("knit ingress not serving: %s", last)
	}
	return nil
}

// saveHeapProfile writes the knit agent's heap profile (the agent runs with
// --pprof) for `go tool pprof`.
func (s *memSetup) saveHeapProfile(path string) error {
	resp, err := http.Get(s.node1.HealthURL() + "/debug/pprof/heap")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET heap profile: %s", resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// wantDNS lists every ClusterIP Service's name and address.
func (s *memSetup) wantDNS(ctx context.Context) (dnsWant, error) {
	list, err := s.client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	want := dnsWant{}
	for _, svc := range list.Items {
		if ip := svc.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone {
			want[svc.Name+"."+svc.Namespace+".svc."+lab.ClusterDomain+"."] = []string{ip}
		}
	}
	return want, nil
}

func memNamespace(i int) string { return fmt.Sprintf("mem-%d", i%memNamespaces) }
func memService(i int) string   { return fmt.Sprintf("svc-%04d", i) }
func memPod(p int) string       { return fmt.Sprintf("pod-%04d", p) }
func memHost(i int) string      { return fmt.Sprintf("h-%03d.mem.test", i) }

// memEndpointPod is the Pod behind endpoint k of Service i: one of the
// memPods/memNamespaces Pods of the Service's namespace (Pod p lives in
// namespace p mod memNamespaces). Service 0's endpoints are Pods 0, 20, ...,
// 180: the real ones.
func memEndpointPod(i, k int) int {
	perNS := memPods / memNamespaces
	idx := (i/memNamespaces*memEndpoints + k) % perNS
	return idx*memNamespaces + i%memNamespaces
}

// memReal reports whether Pod p runs on node1 for real.
func memReal(p int) bool { return p%memNamespaces == 0 && p/memNamespaces < memRealPods }

// createLoad writes the cluster: namespaces, fake nodes, Pods (real ones
// first, to learn their IPs), Services, EndpointSlices, Secrets, Ingresses.
func (s *memSetup) createLoad(ctx context.Context) error {
	for i := range memNamespaces {
		if err := s.cl.EnsureNamespace(ctx, memNamespace(i)); err != nil {
			return err
		}
	}
	type podAt struct{ node, ip string }
	pods := make([]podAt, memPods)
	for p := range memPods {
		if !memReal(p) {
			continue
		}
		pod := lab.EchoPod(memNamespace(p), memPod(p), s.node1.Name, map[string]string{"app": "mem"})
		if _, err := s.client.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	for p := range memPods {
		if !memReal(p) {
			continue
		}
		got, err := s.cl.WaitPodRunning(ctx, memNamespace(p), memPod(p), true, 2*time.Minute)
		if err != nil {
			return err
		}
		pods[p] = podAt{s.node1.Name, got.Status.PodIP}
	}

	// Fake nodes: Node objects with an address and a podCIDR, no netns.
	cidrs := make([]netip.Prefix, memFakeNodes)
	if err := parallel(memWriters, memFakeNodes, func(j int) error {
		c, err := s.fakeNode(ctx, j)
		cidrs[j] = c
		return err
	}); err != nil {
		return err
	}
	next := make([]int, memFakeNodes)
	j := 0
	for p := range memPods {
		if memReal(p) {
			continue
		}
		a := cidrs[j].Addr().As4()
		a[3] = byte(2 + next[j]) // at most memPods/memFakeNodes per /24
		next[j]++
		pods[p] = podAt{memFakeNodeName(j), netip.AddrFrom4(a).String()}
		j = (j + 1) % memFakeNodes
	}
	uids := make([]string, memPods)
	if err := parallel(memWriters, memPods, func(p int) error {
		if memReal(p) {
			got, err := s.client.CoreV1().Pods(memNamespace(p)).Get(ctx, memPod(p), metav1.GetOptions{})
			if err == nil {
				uids[p] = string(got.UID)
			}
			return err
		}
		uid, err := s.fakePod(ctx, p, pods[p].node, pods[p].ip)
		uids[p] = uid
		return err
	}); err != nil {
		return err
	}

	if err := parallel(memWriters, memServices, func(i int) error {
		ns, name := memNamespace(i), memService(i)
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name, "tier": "backend"}},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{
				Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(echo.HTTPPort)}}},
		}
		if i%memNodePortEvery == 0 {
			svc.Spec.Type = corev1.ServiceTypeNodePort
		}
		if _, err := s.client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("service %s/%s: %w", ns, name, err)
		}
		eps := make([]discoveryv1.Endpoint, memEndpoints)
		for k := range eps {
			p := memEndpointPod(i, k)
			eps[k] = discoveryv1.Endpoint{
				Addresses:  []string{pods[p].ip},
				Conditions: discoveryv1.EndpointConditions{Ready: new(true), Serving: new(true), Terminating: new(false)},
				NodeName:   new(pods[p].node),
				TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: memPod(p), UID: types.UID(uids[p])},
			}
		}
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name + "-bench", Namespace: ns, Labels: map[string]string{
				discoveryv1.LabelServiceName: name,
				discoveryv1.LabelManagedBy:   memManagedBy,
			}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   eps,
			Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Protocol: new(corev1.ProtocolTCP), Port: new(int32(echo.HTTPPort))}},
		}
		if _, err := s.client.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("endpointslice %s/%s: %w", ns, slice.Name, err)
		}
		return nil
	}); err != nil {
		return err
	}

	return parallel(memWriters, memIngresses, func(i int) error {
		ns, host := memNamespace(i), memHost(i)
		ing := &networkingv1.Ingress{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ing-%03d", i), Namespace: ns},
			Spec: networkingv1.IngressSpec{
				IngressClassName: new("knit"),
				Rules: []networkingv1.IngressRule{{Host: host, IngressRuleValue: networkingv1.IngressRuleValue{
					HTTP: &networkingv1.HTTPIngressRuleValue{Paths: []networkingv1.HTTPIngressPath{{
						Path: "/", PathType: new(networkingv1.PathTypePrefix),
						Backend: networkingv1.IngressBackend{Service: &networkingv1.IngressServiceBackend{
							Name: memService(i), Port: networkingv1.ServiceBackendPort{Name: "http"}}},
					}}},
				}}},
			},
		}
		if i < memTLS {
			secret, err := memTLSSecret(ns, fmt.Sprintf("tls-%03d", i), host)
			if err != nil {
				return err
			}
			if _, err := s.client.CoreV1().Secrets(ns).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
				return err
			}
			ing.Spec.TLS = []networkingv1.IngressTLS{{Hosts: []string{host}, SecretName: secret.Name}}
		}
		_, err := s.client.NetworkingV1().Ingresses(ns).Create(ctx, ing, metav1.CreateOptions{})
		return err
	})
}

func memFakeNodeName(j int) string { return fmt.Sprintf("mem-node-%02d", j+1) }

// fakeNode registers fake node j (198.18.0.(100+j), no netns behind it: the
// overlay peers with it but nothing is sent to it) and returns the podCIDR
// kube-controller-manager gives it.
func (s *memSetup) fakeNode(ctx context.Context, j int) (netip.Prefix, error) {
	name := memFakeNodeName(j)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
		"kubernetes.io/hostname":      name,
		"kubernetes.io/os":            "linux",
		"topology.kubernetes.io/zone": fmt.Sprintf("zone-%c", 'a'+j%2),
	}}}
	if _, err := s.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		return netip.Prefix{}, err
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		latest, err := s.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		latest.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("198.18.0.%d", 100+j)},
			{Type: corev1.NodeHostName, Address: name},
		}
		latest.Status.Conditions = []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}}
		_, err = s.client.CoreV1().Nodes().UpdateStatus(ctx, latest, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return netip.Prefix{}, err
	}
	var cidr netip.Prefix
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		got, err := s.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil || got.Spec.PodCIDR == "" {
			return false, nil
		}
		cidr, err = netip.ParsePrefix(got.Spec.PodCIDR)
		return err == nil, err
	})
	return cidr, err
}

// fakePod creates Pod p bound to a fake node with a realistic spec, then
// writes the status a kubelet would, and returns its UID.
func (s *memSetup) fakePod(ctx context.Context, p int, node, ip string) (string, error) {
	ns, name := memNamespace(p), memPod(p)
	image := "registry.example.test/team/app:1.4.2"
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{
			"app": "mem", "pod-template-hash": "5d8f7c9b6", "version": "1.4.2"}},
		Spec: corev1.PodSpec{
			NodeName: node,
			Containers: []corev1.Container{{
				Name:  "app",
				Image: image,
				Args:  []string{"--listen=:8080", "--log-level=info"},
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: echo.HTTPPort, Protocol: corev1.ProtocolTCP}},
				Env: []corev1.EnvVar{
					{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
					{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
					{Name: "GOMAXPROCS", Value: "2"},
				},
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
					Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
				},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
					Path: "/healthz", Port: intstr.FromString("http")}}, PeriodSeconds: 5},
			}},
		},
	}
	created, err := s.client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("pod %s/%s: %w", ns, name, err)
	}
	now := metav1.Now()
	hostIP := ""
	for j := range memFakeNodes {
		if memFakeNodeName(j) == node {
			hostIP = fmt.Sprintf("198.18.0.%d", 100+j)
		}
	}
	created.Status = corev1.PodStatus{
		Phase:     corev1.PodRunning,
		HostIP:    hostIP,
		HostIPs:   []corev1.HostIP{{IP: hostIP}},
		PodIP:     ip,
		PodIPs:    []corev1.PodIP{{IP: ip}},
		StartTime: &now,
		QOSClass:  corev1.PodQOSBurstable,
		Conditions: []corev1.PodCondition{
			{Type: "PodReadyToStartContainers", Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: "app", Ready: true, Started: new(true), Image: image,
			ImageID:     "registry.example.test/team/app@sha256:4c1f3b0d2a9e8f7c6b5a4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a",
			ContainerID: fmt.Sprintf("containerd://%064x", p+1),
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		}},
	}
	if _, err := s.client.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return "", fmt.Errorf("pod status %s/%s: %w", ns, name, err)
	}
	return string(created.UID), nil
}

// memTLSSecret is a kubernetes.io/tls Secret with a fresh self-signed
// ECDSA certificate for host.
func memTLSSecret(ns, name, host string) (*corev1.Secret, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: host},
		DNSNames:     []string{host},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Type:       corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		},
	}, nil
}

// memWaitMap waits until an nftables map of the node holds at least want
// elements.
func memWaitMap(ctx context.Context, n *lab.Node, family, table, name string, want int) error {
	var got int
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, memSyncTimeout, true, func(ctx context.Context) (bool, error) {
		got, lastErr = proxyMapCount(ctx, n, family, table, name)
		return lastErr == nil && got >= want, nil
	})
	if err != nil {
		return fmt.Errorf("map %s %s %s on %s: %d of %d elements (last error %v)", family, table, name, n.Name, got, want, lastErr)
	}
	return nil
}

// memBinaryResident returns the resident bytes of the process's own
// binary's mappings by permission: r-x (code), r-- (read-only data: type
// descriptors, pclntab), rw- (data and bss, which turn anonymous when
// written), from /proc/<pid>/smaps.
func memBinaryResident(pid int) (text, rodata, data int64) {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return 0, 0, 0
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, 0, 0
	}
	var cur *int64
	for line := range strings.Lines(string(raw)) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if strings.Contains(f[0], "-") && len(f) >= 5 {
			// A mapping header: address perms offset dev inode [path].
			cur = nil
			if len(f) >= 6 && f[5] == exe {
				switch f[1] {
				case "r-xp":
					cur = &text
				case "r--p":
					cur = &rodata
				case "rw-p":
					cur = &data
				}
			}
			continue
		}
		if f[0] == "Rss:" && cur != nil && len(f) >= 2 {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			*cur += kb << 10
		}
	}
	return text, rodata, data
}

// memMetrics reads the untyped value of every unlabelled metric of a
// Prometheus text page.
func memMetrics(url string) map[string]int64 {
	out := map[string]int64{}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for line := range strings.Lines(string(body)) {
		if strings.HasPrefix(line, "#") || strings.Contains(line, "{") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		if v, err := strconv.ParseFloat(f[1], 64); err == nil {
			out[f[0]] = int64(v)
		}
	}
	return out
}

// memShippedSize is what a binary weighs without its symbol table and
// DWARF (what `go build -ldflags=-s -w`, and so knit's image, ships): the
// file size less the sections strip removes.
func memShippedSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	f, err := elf.Open(path)
	if err != nil {
		return st.Size()
	}
	defer f.Close()
	size := st.Size()
	for _, s := range f.Sections {
		if strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_") || s.Name == ".symtab" || s.Name == ".strtab" {
			size -= int64(s.FileSize)
		}
	}
	return size
}

func memMiB(v int64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", float64(v)/(1<<20))
}

// memReport returns the results table.
func memReport(b *testing.B, procs []*memProc, phases []string, bins map[string]string, created time.Duration) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nMemory: %d Services (every %dth NodePort) x %d endpoints = %d endpoints, %d Pods (%d running on node1), %d fake + 2 lab Nodes, %d Ingresses (%d TLS); objects written in %.1f s\n",
		memServices, memNodePortEvery, memEndpoints, memServices*memEndpoints, memPods, memRealPods, memFakeNodes,
		memIngresses, memTLS, created.Seconds())
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "phase\tprocess\tRSS MiB (median, max)\tpeak\tanon\tfile\tbinary text / rodata / data\tGo heap inuse / sys\tstacks\tGo sys\tsynced after\tCPU s to synced / idle after\t")
	for _, phase := range phases {
		var sum memReading
		anchors := 0
		for _, p := range procs {
			r := p.readings[phase]
			if r == nil {
				continue
			}
			fmt.Fprintf(w, "%s\t%s\t%s (%s)\t%s\t%s\t%s\t%s / %s / %s\t%s / %s\t%s\t%s\t%.1f s\t%.2f / %.2f\t\n", phase, p.name,
				memMiB(r.rss), memMiB(r.rssMax), memMiB(r.hwm), memMiB(r.anon), memMiB(r.file),
				memMiB(r.text), memMiB(r.rodata), memMiB(r.data), memMiB(r.heapInuse), memMiB(r.heapSys),
				memMiB(r.stacks), memMiB(r.goSys), r.synced.Seconds(), r.cpuSynced.Seconds(), (r.cpuEnd - r.cpuSynced).Seconds())
			if p != procs[0] {
				anchors++
				sum.rss += r.rss
				sum.hwm += r.hwm
				sum.anon += r.anon
				sum.file += r.file
			}
			b.ReportMetric(float64(r.rss)/(1<<20), strings.ReplaceAll(fmt.Sprintf("%s-%s-rss-MiB", strings.Fields(p.name)[0], phase), " ", "_"))
		}
		if anchors < 2 {
			continue
		}
		k := procs[0].readings[phase]
		fmt.Fprintf(w, "%s\tkube-proxy + CoreDNS\t%s\t%s\t%s\t%s\t\t\t\t\t\t\n", phase, memMiB(sum.rss), memMiB(sum.hwm), memMiB(sum.anon), memMiB(sum.file))
		fmt.Fprintf(w, "%s\tknit / (kube-proxy + CoreDNS)\t%.2f\t%.2f\t%.2f\t%.2f\t\t\t\t\t\t\n", phase,
			float64(k.rss)/float64(max(sum.rss, 1)), float64(k.hwm)/float64(max(sum.hwm, 1)),
			float64(k.anon)/float64(max(sum.anon, 1)), float64(k.file)/float64(max(sum.file, 1)))
	}
	w.Flush()
	sb.WriteString("binaries (file size; without symbols and DWARF, what -ldflags='-s -w' ships; knit and knit-cni are built that way):\n")
	for _, name := range []string{"knit", "knit-cni", "kube-proxy", "coredns"} {
		st, err := os.Stat(bins[name])
		if err != nil {
			continue
		}
		fmt.Fprintf(&sb, "  %-10s %6.1f MiB; %6.1f MiB\n", name, float64(st.Size())/(1<<20), float64(memShippedSize(bins[name]))/(1<<20))
	}
	for _, phase := range phases[1:] {
		k := procs[0].readings[phase]
		verdict := "met"
		if k.rss > memTargetMiB<<20 {
			verdict = "MISSED"
		}
		fmt.Fprintf(&sb, "target: knit agent RSS <= %d MiB, %s (median after %v settled): %s (%s MiB; peak %s MiB)\n",
			memTargetMiB, phase, memSettle, verdict, memMiB(k.rss), memMiB(k.hwm))
	}
	return sb.String()
}
