package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/anchors"
	"knit.dev/knit/lab/sandbox"
)

// The cluster the DNS benchmark serves: 1,000 Services over 20 namespaces,
// every fifth one headless, each with one EndpointSlice of two ready
// endpoints (the Services have no selector, so the slices are the
// benchmark's own and no controller rewrites them).
const (
	dnsServices      = 1000
	dnsNamespaces    = 20
	dnsHeadlessEvery = 5
	dnsEndpoints     = 2
)

// Where the two servers listen, both inside node1's netns on the CPU core
// dnsCoreServer, and where dnsperf runs (same netns, core dnsCoreClient).
// knit answers the cluster DNS Service IP as in production (the agent puts
// it on a local link); CoreDNS binds the node's own address. Both are local
// addresses of the netns, so both paths are the loopback device.
const (
	dnsKnitAddr    = lab.ClusterDNS // 10.43.0.10
	dnsCoreDNSAddr = "198.18.0.1"
	dnsCoreServer  = "0"
	dnsCoreClient  = "1"
)

// The load. Every run lasts dnsRunSeconds; the throughput run sends as fast
// as the server answers (dnsperf keeps dnsOutstanding queries in flight over
// dnsClients sockets), the latency run sends one fixed rate to both and
// records every answer's latency for the percentiles. That rate is
// dnsFixedQPS (DESIGN.md's CoreDNS anchor: p99 0.83 ms at 20k queries/s),
// but at most dnsFixedShare of the rate CoreDNS reached in the same round:
// on a loaded machine CoreDNS may not sustain 20k, and the p99 of a
// saturated server measures its queue, not its latency. Rounds alternate
// the order of the servers, so that a burst of load from elsewhere hits
// both alike; the table shows the median round. The latency runs are cut
// into dnsLatencySlices alternating slices: one burst of load from
// elsewhere decides the p99 of the run it falls in (trial runs on the
// loaded machine gave per-run p99s from 0.6 to 100 ms for the same
// server), and the median over many short runs discards it.
//
// The window and the socket buffers matter on a shared machine. knit asks
// for a 4 MiB receive buffer; CoreDNS keeps the kernel default (208 KiB,
// a few hundred queued queries). With 500 queries in flight, every stall
// of CoreDNS's core overflowed its buffer, and each dropped query then held
// one of dnsperf's slots for the whole timeout (-t): that measured dnsperf's
// timeout, not CoreDNS (20k queries/s, about 1% lost, in a trial run). With
// 100 in flight nothing was lost, but whenever other work held the core
// for a few milliseconds the window ran dry, and the rate measured the
// scheduler's latency rather than the server (CoreDNS busy 22% of the
// core at its "maximum"). So CoreDNS's listening socket is given the
// buffer knit asks for (dnsSetRcvbuf; net.core.rmem_default cannot be
// written in a child netns here), dnsperf gets it too (-b), and 500 in
// flight keep both servers busy through a stall. This takes knit's larger
// buffer out of the comparison; the "drops" column counts the node's UDP
// receive-buffer overflows during each run and "core busy" whether each
// server was saturated.
const (
	dnsRunSeconds    = 10
	dnsRounds        = 3
	dnsClients       = 4
	dnsOutstanding   = 500
	dnsSocketBuffer  = 4 << 20
	dnsFixedQPS      = 20000
	dnsFixedShare    = 0.5
	dnsLatencySlices = 3
	dnsQueryLines    = 20000 // lines of the cluster-name query file
)

// dnsExternal are the cached external names: served by the lab's upstream
// resolver (lab.UpstreamZone, TTL 60 s), fetched once by each server before
// the runs.
var dnsExternal = []string{"www", "api", "cdn", "mail", "img", "static", "auth", "login", "news", "shop"}

// Target (DESIGN.md): at least 1.5x CoreDNS's queries/s on the same pinned
// core, with p99 no worse.
const dnsTargetRatio = 1.5

// The Corefile: the kube-dns default that kubeadm installs, minus the
// plugins the anchor build leaves out (see lab/anchors/coredns), plus bind.
const dnsCorefile = `.:53 {
    bind %s
    errors
    health %s:8080
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig %s
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    forward . %s {
        max_concurrent 1000
    }
    cache 30
}
`

// BenchmarkDNS measures knit's cluster DNS against CoreDNS (DESIGN.md,
// "Targets"): queries/s at full load and latency at a fixed rate, for
// cluster names and for cached external names, plus each server's CPU time
// per query and memory. One lab node runs both servers, each pinned with
// taskset to one core, and dnsperf pinned to the other; the control plane is
// real and both servers read the same 1,000 Services from it. It reports
// the target it misses without failing (timing on a shared machine is
// evidence, not a verdict a test should enforce). -short runs one round of
// 5-second runs.
//
//	go test -run '^$' -bench BenchmarkDNS -benchtime 1x ./bench/
func BenchmarkDNS(b *testing.B) {
	sandbox.Require(b)
	for _, tool := range []string{"dnsperf", "taskset"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s not installed (Debian package dnsperf / util-linux)", tool)
		}
	}
	ctx := context.Background()
	began := time.Now()
	rounds, secs := dnsRounds, dnsRunSeconds
	if testing.Short() {
		rounds, secs = 1, 5
	}

	cacheDir, err := lab.CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	dir := filepath.Join(cacheDir, "bench", "dns")
	if err := os.RemoveAll(dir); err != nil {
		b.Fatal(err)
	}
	knitBin, corednsBin := dnsBuild(ctx, b, cacheDir, dir)
	built := time.Since(began)

	// A one-node lab whose agent runs DNS only; that agent is replaced by a
	// pinned one below, once the Services exist.
	cl, err := lab.Up(ctx, lab.Options{
		Nodes:      1,
		WorkDir:    filepath.Join(dir, "lab"),
		CacheDir:   cacheDir,
		KnitBinary: knitBin,
		Components: "dns",
		Log:        slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		b.Fatalf("lab up: %v", err)
	}
	defer cl.Down()
	node := cl.Nodes[0]
	labUp := time.Since(began) - built

	want, err := dnsCreateCluster(ctx, cl)
	if err != nil {
		b.Fatal(err)
	}
	created := time.Since(began) - built - labUp

	// The servers start pinned, so that the Go runtime of each sizes
	// GOMAXPROCS (1) from its CPU affinity, and after the objects exist,
	// so that both list the same 1,000 Services at start-up.
	node.StopAgent()
	knit, err := dnsStart(dir, "knit", "taskset", "-c", dnsCoreServer, "ip", "netns", "exec", node.Name, knitBin, "agent",
		"--node-name", node.Name,
		"--kubeconfig", cl.Kubeconfig(),
		"--components", "dns",
		"--health-addr", node.IP+":"+strconv.Itoa(lab.AgentHealthPort),
		"--state-dir", filepath.Join(node.Dir, "state"),
		"--run-dir", filepath.Join(node.Dir, "run"),
		"--cluster-cidr", lab.ClusterCIDR,
		"--service-cidr", lab.ServiceCIDR,
		"--cluster-dns", dnsKnitAddr,
		"--dns-upstream", lab.UpstreamAddr,
		"--log-level", "warn")
	if err != nil {
		b.Fatal(err)
	}
	defer knit.stop()
	corefile := filepath.Join(dir, "Corefile")
	if err := os.WriteFile(corefile, fmt.Appendf(nil, dnsCorefile, dnsCoreDNSAddr, dnsCoreDNSAddr, cl.Kubeconfig(), lab.UpstreamAddr), 0o644); err != nil {
		b.Fatal(err)
	}
	coredns, err := dnsStart(dir, "coredns", "taskset", "-c", dnsCoreServer, "ip", "netns", "exec", node.Name, corednsBin, "-conf", corefile)
	if err != nil {
		b.Fatal(err)
	}
	defer coredns.stop()
	servers := []*dnsServer{knit, coredns}
	knit.addr, coredns.addr = dnsKnitAddr, dnsCoreDNSAddr

	// Both must answer every name exactly as the objects say (and the
	// external names, which fills their caches) before anything is timed.
	for _, s := range servers {
		if err := dnsWaitAnswers(ctx, node.Netns(), s, want, 2*time.Minute); err != nil {
			b.Fatal(err)
		}
	}
	synced := time.Since(began) - built - labUp - created

	for _, s := range servers {
		addr := netip.AddrPortFrom(netip.MustParseAddr(s.addr), 53)
		if s == coredns {
			if err := dnsSetRcvbuf(s.pid(), addr, dnsSocketBuffer); err != nil {
				b.Fatal(err)
			}
		}
		if s.rcvbuf, err = dnsRcvbuf(s.pid(), addr); err != nil {
			b.Fatal(err)
		}
	}

	sets, err := dnsQueryFiles(dir)
	if err != nil {
		b.Fatal(err)
	}
	load := dnsLoadAvg()
	b.ResetTimer()
	var runs []dnsRun
	for round := range rounds {
		for _, set := range sets {
			// Throughput of both, then latency of both at a rate
			// both sustain, in dnsLatencySlices short runs each,
			// alternating.
			for k := range servers {
				s := servers[(round+k)%len(servers)]
				r, err := dnsperf(ctx, node.Name, s, set, secs, 0)
				if err != nil {
					b.Fatal(err)
				}
				r.round = round
				runs = append(runs, r)
			}
			rate := dnsFixedRate(runs[len(runs)-len(servers):], coredns.name)
			for slice := range dnsLatencySlices {
				for k := range servers {
					s := servers[(round+slice+k)%len(servers)]
					r, err := dnsperf(ctx, node.Name, s, set, max(2, secs/dnsLatencySlices), rate)
					if err != nil {
						b.Fatal(err)
					}
					r.round = round
					runs = append(runs, r)
				}
			}
		}
	}
	b.StopTimer()
	for _, s := range servers {
		s.mem = procMemory(s.pid())
	}

	table := dnsReport(b, runs, servers, rounds, secs)
	table += fmt.Sprintf("load average %s before the runs, %s after; wall %v (builds %v, lab up %v, objects %v, servers synced %v)\n",
		load, dnsLoadAvg(), time.Since(began).Round(time.Second), built.Round(time.Second), labUp.Round(time.Second),
		created.Round(time.Second), synced.Round(time.Second))
	// The testing package shortens a benchmark's log; print the table
	// whole and keep a copy next to the run's files.
	fmt.Print(table)
	if err := os.WriteFile(filepath.Join(dir, "results.txt"), []byte(table), 0o644); err != nil {
		b.Error(err)
	}
}

// dnsBuild builds (or finds up to date) knit and the CoreDNS anchor and
// copies both into dir/bin, so that a rebuild by someone else mid-run
// cannot swap them.
func dnsBuild(ctx context.Context, b *testing.B, cacheDir, dir string) (knit, coredns string) {
	b.Helper()
	knitSrc, err := lab.BuildKnit(ctx, cacheDir)
	if err != nil {
		b.Fatal(err)
	}
	corednsSrc, err := anchors.Build(ctx, cacheDir)
	if err != nil {
		b.Fatalf("%v\n(with a cold module cache, run `go mod download` in lab/anchors/coredns outside the sandbox first)", err)
	}
	binDir := filepath.Join(dir, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		b.Fatal(err)
	}
	knit, coredns = filepath.Join(binDir, "knit"), filepath.Join(binDir, "knit-coredns")
	for src, dst := range map[string]string{knitSrc: knit, corednsSrc: coredns} {
		if err := copyExecutable(src, dst); err != nil {
			b.Fatal(err)
		}
	}
	return knit, coredns
}

// dnsWant maps each query name to the addresses it must answer, sorted.
type dnsWant map[string][]string

// dnsCreateCluster creates the namespaces, Services and EndpointSlices and
// returns the expected answer of every Service name.
func dnsCreateCluster(ctx context.Context, cl *lab.Cluster) (dnsWant, error) {
	cfg := *cl.Config
	cfg.QPS, cfg.Burst = 1000, 1000
	client, err := kubernetes.NewForConfig(&cfg)
	if err != nil {
		return nil, err
	}
	for i := range dnsNamespaces {
		if err := cl.EnsureNamespace(ctx, fmt.Sprintf("dns-%d", i)); err != nil {
			return nil, err
		}
	}
	want := dnsWant{}
	var mu sync.Mutex
	work := make(chan int)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range work {
				name, addrs, err := dnsCreateService(ctx, client, i)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				want[name] = addrs
				mu.Unlock()
			}
		})
	}
	var sendErr error
	for i := range dnsServices {
		select {
		case work <- i:
		case sendErr = <-errs:
		}
		if sendErr != nil {
			break
		}
	}
	close(work)
	wg.Wait()
	close(errs)
	if sendErr != nil {
		return nil, sendErr
	}
	if err := <-errs; err != nil {
		return nil, err
	}
	return want, nil
}

// dnsCreateService creates Service i and its EndpointSlice and returns its
// query name and expected A records.
func dnsCreateService(ctx context.Context, client kubernetes.Interface, i int) (string, []string, error) {
	nsName, svcName := fmt.Sprintf("dns-%d", i%dnsNamespaces), fmt.Sprintf("svc-%d", i)
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: svcName, Namespace: nsName},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP},
		}},
	}
	headless := i%dnsHeadlessEvery == 0
	if headless {
		svc.Spec.ClusterIP = corev1.ClusterIPNone
	}
	created, err := client.CoreV1().Services(nsName).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return "", nil, fmt.Errorf("service %s/%s: %w", nsName, svcName, err)
	}
	ready := true
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: svcName + "-bench", Namespace: nsName, Labels: map[string]string{
			discoveryv1.LabelServiceName: svcName,
			discoveryv1.LabelManagedBy:   "bench.knit.dev",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(8080)), Protocol: new(corev1.ProtocolTCP)}},
	}
	var endpointIPs []string
	for j := range dnsEndpoints {
		k := i*dnsEndpoints + j
		ip := fmt.Sprintf("10.42.%d.%d", 1+k/250, 1+k%250)
		endpointIPs = append(endpointIPs, ip)
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{ip},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		})
	}
	if _, err := client.DiscoveryV1().EndpointSlices(nsName).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return "", nil, fmt.Errorf("endpointslice %s/%s: %w", nsName, slice.Name, err)
	}
	name := svcName + "." + nsName + ".svc." + lab.ClusterDomain + "."
	if headless {
		return name, endpointIPs, nil
	}
	return name, []string{created.Spec.ClusterIP}, nil
}

// dnsServer is one server process under test.
type dnsServer struct {
	name string
	addr string
	cmd  *exec.Cmd
	done chan struct{}
	log  string

	mem    map[string]int64 // /proc/<pid>/status memory fields in bytes, read after the runs
	rcvbuf int              // SO_RCVBUF of its UDP socket, bytes
}

// dnsStart starts argv with output to dir/<name>.log.
func dnsStart(dir, name string, argv ...string) (*dnsServer, error) {
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	s := &dnsServer{name: name, cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() { _ = cmd.Wait(); logf.Close(); close(s.done) }()
	return s, nil
}

// pid is the server's process: taskset and `ip netns exec` exec into it.
func (s *dnsServer) pid() int { return s.cmd.Process.Pid }

func (s *dnsServer) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// dnsWaitAnswers queries every name of want (and every external name) on s
// from inside the node's netns until all answers are exactly right.
func dnsWaitAnswers(ctx context.Context, netns string, s *dnsServer, want dnsWant, timeout time.Duration) error {
	all := maps.Clone(want)
	for _, e := range dnsExternal {
		all[e+"."+lab.UpstreamZone] = []string{lab.UpstreamAnswer}
	}
	deadline := time.Now().Add(timeout)
	var last string
	for {
		select {
		case <-s.done:
			return fmt.Errorf("%s exited while starting; see %s", s.name, s.log)
		default:
		}
		var bad int
		err := ns.WithNetNSPath(netns, func(ns.NetNS) error {
			c := &mdns.Client{Net: "udp", Timeout: time.Second}
			conn, err := c.Dial(netipJoin(s.addr))
			if err != nil {
				return err
			}
			defer conn.Close()
			for name, addrs := range all {
				m := new(mdns.Msg)
				m.SetQuestion(name, mdns.TypeA)
				r, _, err := c.ExchangeWithConnContext(ctx, m, conn)
				got := dnsAddrs(r)
				if err != nil || r.Rcode != mdns.RcodeSuccess || !slices.Equal(got, addrs) {
					if bad++; bad == 1 {
						last = fmt.Sprintf("%s: want %v, got %v (err %v)", name, addrs, got, err)
					}
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if bad == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %d of %d names still wrong after %v, e.g. %s; see %s", s.name, bad, len(all), timeout, last, s.log)
		}
		time.Sleep(time.Second)
	}
}

func netipJoin(addr string) string {
	return netip.AddrPortFrom(netip.MustParseAddr(addr), 53).String()
}

// dnsAddrs returns the A records of r, sorted.
func dnsAddrs(r *mdns.Msg) []string {
	if r == nil {
		return nil
	}
	var out []string
	for _, rr := range r.Answer {
		if a, ok := rr.(*mdns.A); ok {
			out = append(out, a.A.String())
		}
	}
	slices.Sort(out)
	return out
}

// dnsFixedRate is the latency runs' rate: dnsFixedQPS, but at most
// dnsFixedShare of what the anchor reached in throughput, rounded down to
// a thousand (and at least a thousand).
func dnsFixedRate(throughput []dnsRun, anchor string) int {
	rate := dnsFixedQPS
	for _, r := range throughput {
		if r.server == anchor {
			rate = min(rate, int(r.qps*dnsFixedShare))
		}
	}
	return max(1000, rate/1000*1000)
}

// dnsQuerySet is one dnsperf input file.
type dnsQuerySet struct{ name, path string }

// dnsQueryFiles writes the two query files: A of Service names drawn
// uniformly (fixed seed) over the 1,000, and A of the external names in
// turn.
func dnsQueryFiles(dir string) ([]dnsQuerySet, error) {
	var cluster, external strings.Builder
	rng := rand.New(rand.NewPCG(1, 2))
	for range dnsQueryLines {
		i := rng.IntN(dnsServices)
		fmt.Fprintf(&cluster, "svc-%d.dns-%d.svc.%s. A\n", i, i%dnsNamespaces, lab.ClusterDomain)
	}
	for _, e := range dnsExternal {
		fmt.Fprintf(&external, "%s.%s A\n", e, lab.UpstreamZone)
	}
	sets := []dnsQuerySet{
		{"cluster", filepath.Join(dir, "queries-cluster.txt")},
		{"external", filepath.Join(dir, "queries-external.txt")},
	}
	for i, text := range []string{cluster.String(), external.String()} {
		if err := os.WriteFile(sets[i].path, []byte(text), 0o644); err != nil {
			return nil, err
		}
	}
	return sets, nil
}

// dnsRun is the outcome of one dnsperf run.
type dnsRun struct {
	server, set string
	fixed       bool // at rate rather than as fast as possible
	rate        int
	round       int

	sent, completed, lost int
	noerror               int
	qps                   float64
	avg                   time.Duration
	latencies             []time.Duration // fixed-rate runs only, sorted
	cpu                   time.Duration   // the server's user+system CPU time during the run
	wall                  time.Duration   // how long the run took, dnsperf's start-up included
	drops                 int             // UDP receive-buffer overflows in the node's netns (server and dnsperf)
	command               string
}

// dnsperf runs dnsperf in the node's netns on dnsCoreClient against s: as
// fast as s answers when rate is 0, else at rate queries/s, recording
// every latency.
func dnsperf(ctx context.Context, netns string, s *dnsServer, set dnsQuerySet, secs int, rate int) (dnsRun, error) {
	fixed := rate > 0
	args := []string{"-c", dnsCoreClient, "ip", "netns", "exec", netns, "dnsperf",
		"-s", s.addr, "-d", set.path, "-l", strconv.Itoa(secs),
		"-c", strconv.Itoa(dnsClients), "-q", strconv.Itoa(dnsOutstanding), "-t", "2",
		"-b", strconv.Itoa(dnsSocketBuffer >> 10)}
	if fixed {
		args = append(args, "-Q", strconv.Itoa(rate), "-v")
	}
	r := dnsRun{server: s.name, set: set.name, fixed: fixed, rate: rate, command: "taskset " + strings.Join(args, " ")}
	cmd := exec.CommandContext(ctx, "taskset", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return r, err
	}
	cpu0, err := procCPU(s.pid())
	if err != nil {
		return r, fmt.Errorf("%s: %w", s.name, err)
	}
	drops0, err := dnsUDPDrops(s.pid())
	if err != nil {
		return r, err
	}
	began := time.Now()
	if err := cmd.Start(); err != nil {
		return r, err
	}
	var summary []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		// Verbose lines: "> NOERROR name type latency-seconds".
		if f := strings.Fields(line); len(f) == 5 && f[0] == ">" {
			if sec, err := strconv.ParseFloat(f[4], 64); err == nil {
				r.latencies = append(r.latencies, time.Duration(sec*float64(time.Second)))
			}
			continue
		}
		summary = append(summary, line)
	}
	if err := cmd.Wait(); err != nil {
		return r, fmt.Errorf("%s: %v\n%s%s", r.command, err, strings.Join(summary, "\n"), stderr.String())
	}
	cpu1, err := procCPU(s.pid())
	if err != nil {
		return r, fmt.Errorf("%s: %w", s.name, err)
	}
	r.cpu = cpu1 - cpu0
	drops1, err := dnsUDPDrops(s.pid())
	if err != nil {
		return r, err
	}
	r.drops = drops1 - drops0
	r.wall = time.Since(began)
	if err := r.parse(summary); err != nil {
		return r, fmt.Errorf("%s: %v\n%s", r.command, err, strings.Join(summary, "\n"))
	}
	if r.completed == 0 || r.noerror < r.completed*999/1000 {
		return r, fmt.Errorf("%s against %s: %d of %d answers NOERROR\n%s", r.command, s.name, r.noerror, r.completed, strings.Join(summary, "\n"))
	}
	slices.Sort(r.latencies)
	return r, nil
}

// parse reads dnsperf's statistics block.
func (r *dnsRun) parse(lines []string) error {
	var found int
	for _, line := range lines {
		key, val, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		f := strings.Fields(val)
		if len(f) == 0 {
			continue
		}
		switch key {
		case "Queries sent":
			r.sent, _ = strconv.Atoi(f[0])
			found++
		case "Queries completed":
			r.completed, _ = strconv.Atoi(f[0])
			found++
		case "Queries lost":
			r.lost, _ = strconv.Atoi(f[0])
			found++
		case "Queries per second":
			r.qps, _ = strconv.ParseFloat(f[0], 64)
			found++
		case "Average Latency (s)":
			sec, _ := strconv.ParseFloat(f[0], 64)
			r.avg = time.Duration(sec * float64(time.Second))
			found++
		case "Response codes":
			for i := 0; i+1 < len(f); i += 3 {
				if f[i] == "NOERROR" {
					r.noerror, _ = strconv.Atoi(strings.TrimSuffix(f[i+1], ","))
				}
			}
		}
	}
	if found != 5 {
		return errors.New("dnsperf statistics not found")
	}
	return nil
}

// percentileMS returns the p-quantile of the run's latencies in
// milliseconds, counting every lost query as slower than any answer (+Inf
// when the quantile falls on one).
func (r *dnsRun) percentileMS(p float64) float64 {
	n := len(r.latencies) + r.lost
	if n == 0 {
		return math.NaN()
	}
	i := max(0, min(int(math.Ceil(float64(n)*p))-1, n-1))
	if i >= len(r.latencies) {
		return math.Inf(1)
	}
	return float64(r.latencies[i]) / float64(time.Millisecond)
}

// dnsUDPDrops returns the RcvbufErrors counter of the network namespace
// of pid: datagrams dropped because a socket's receive buffer was full.
func dnsUDPDrops(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/snmp", pid))
	if err != nil {
		return 0, err
	}
	var names []string
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		if i := slices.Index(names, "RcvbufErrors"); i > 0 && i < len(f) {
			return strconv.Atoi(f[i])
		}
	}
	return 0, fmt.Errorf("no Udp RcvbufErrors in /proc/%d/net/snmp", pid)
}

// dnsUDPSockets returns the file descriptors of pid's UDP sockets bound to
// addr, found through the socket inodes of /proc/<pid>/net/udp.
func dnsUDPSockets(pid int, addr netip.AddrPort) ([]int, error) {
	if !addr.Addr().Is4() {
		return nil, errors.New("IPv4 only")
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/udp", pid))
	if err != nil {
		return nil, err
	}
	// local_address is the IPv4 address as a host-order (little-endian
	// on the lab's amd64) hex word and the port in hex.
	a := addr.Addr().As4()
	local := fmt.Sprintf("%02X%02X%02X%02X:%04X", a[3], a[2], a[1], a[0], addr.Port())
	inodes := map[string]bool{}
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) > 9 && f[1] == local {
			inodes["socket:["+f[9]+"]"] = true
		}
	}
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, e := range entries {
		if link, err := os.Readlink(filepath.Join(fdDir, e.Name())); err == nil && inodes[link] {
			fd, _ := strconv.Atoi(e.Name())
			fds = append(fds, fd)
		}
	}
	if len(fds) == 0 {
		return nil, fmt.Errorf("no UDP socket of pid %d bound to %v", pid, addr)
	}
	return fds, nil
}

// withSocket calls f with a duplicate of each of pid's UDP sockets bound
// to addr (pidfd_getfd(2): the same socket, not a copy).
func withSocket(pid int, addr netip.AddrPort, f func(fd int) error) error {
	fds, err := dnsUDPSockets(pid, addr)
	if err != nil {
		return err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	for _, target := range fds {
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if err != nil {
			return fmt.Errorf("pidfd_getfd %d/%d: %w", pid, target, err)
		}
		err = f(fd)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

// dnsSetRcvbuf sets SO_RCVBUF on pid's UDP sockets bound to addr, as the
// process itself would with setsockopt (the kernel doubles the value, as
// for knit's own SetReadBuffer).
func dnsSetRcvbuf(pid int, addr netip.AddrPort, size int) error {
	return withSocket(pid, addr, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size)
	})
}

// dnsRcvbuf returns SO_RCVBUF of pid's (first) UDP socket bound to addr.
func dnsRcvbuf(pid int, addr netip.AddrPort) (int, error) {
	size := 0
	err := withSocket(pid, addr, func(fd int) error {
		v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
		if size == 0 {
			size = v
		}
		return err
	})
	return size, err
}

func dnsLoadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(data))[:3], " ")
}

// dnsReport reports the metrics and returns the results table.
func dnsReport(b *testing.B, runs []dnsRun, servers []*dnsServer, rounds, secs int) string {
	type key struct {
		server, set string
		fixed       bool
	}
	by := map[key][]dnsRun{}
	for _, r := range runs {
		k := key{r.server, r.set, r.fixed}
		by[k] = append(by[k], r)
	}
	// median over rounds of f (the mean of the middle two for an even
	// count).
	median := func(k key, f func(dnsRun) float64) float64 {
		var v []float64
		for _, r := range by[k] {
			v = append(v, f(r))
		}
		if len(v) == 0 {
			return math.NaN()
		}
		slices.Sort(v)
		return (v[(len(v)-1)/2] + v[len(v)/2]) / 2
	}
	each := func(k key, format string, f func(dnsRun) float64) string {
		var parts []string
		for _, r := range by[k] {
			parts = append(parts, fmt.Sprintf(format, f(r)))
		}
		return strings.Join(parts, ", ")
	}
	// perRound lists the fixed rate of each round.
	perRound := func(k key) string {
		var parts []string
		last := -1
		for _, r := range by[k] {
			if r.round != last {
				parts = append(parts, strconv.Itoa(r.rate))
				last = r.round
			}
		}
		return strings.Join(parts, ", ")
	}
	qps := func(r dnsRun) float64 { return r.qps }
	usPerQuery := func(r dnsRun) float64 {
		return float64(r.cpu) / float64(time.Microsecond) / float64(max(r.completed, 1))
	}
	p := func(q float64) func(dnsRun) float64 {
		return func(r dnsRun) float64 { return r.percentileMS(q) }
	}
	drops := func(r dnsRun) float64 { return float64(r.drops) }
	busy := func(r dnsRun) float64 { return 100 * float64(r.cpu) / float64(max(r.wall, 1)) }
	lostPct := func(r dnsRun) float64 { return 100 * float64(r.lost) / float64(max(r.sent, 1)) }

	var sb strings.Builder
	fmt.Fprintf(&sb, "DNS: knit vs CoreDNS, %d Services (every %dth headless, %d ready endpoints each), servers on core %s, dnsperf on core %s; %d round(s) of %d s runs\n",
		dnsServices, dnsHeadlessEvery, dnsEndpoints, dnsCoreServer, dnsCoreClient, rounds, secs)
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "names\tserver\tmax qps (per round)\tlost\tdrops\tcore busy\tCPU us/query\tfixed qps (per round)\tp50 / p99 / p99.9 ms, median of runs (each run's p99)\tlost\t")
	misses := 0
	for _, set := range []string{"cluster", "external"} {
		for _, s := range servers {
			mx, fx := key{s.name, set, false}, key{s.name, set, true}
			fmt.Fprintf(w, "%s\t%s\t%.0f (%s)\t%.3f%%\t%s\t%.0f%%\t%.1f\t%s\t%.3f / %.3f / %.3f (%s)\t%.3f%%\t\n", set, s.name,
				median(mx, qps), each(mx, "%.0f", qps), median(mx, lostPct), each(mx, "%.0f", drops), median(mx, busy), median(mx, usPerQuery),
				perRound(fx),
				median(fx, p(0.5)), median(fx, p(0.99)), median(fx, p(0.999)), each(fx, "%.2f", p(0.99)), median(fx, lostPct))
			b.ReportMetric(median(mx, qps), fmt.Sprintf("%s-%s-qps", s.name, set))
			b.ReportMetric(median(fx, p(0.99)), fmt.Sprintf("%s-%s-p99-ms", s.name, set))
		}
		k, c := servers[0].name, servers[1].name
		ratio := median(key{k, set, false}, qps) / median(key{c, set, false}, qps)
		cpuRatio := median(key{c, set, false}, usPerQuery) / median(key{k, set, false}, usPerQuery)
		p99k, p99c := median(key{k, set, true}, p(0.99)), median(key{c, set, true}, p(0.99))
		verdict := "ok"
		var miss []string
		if ratio < dnsTargetRatio {
			miss = append(miss, fmt.Sprintf("qps < %.1fx", dnsTargetRatio))
		}
		if p99k > p99c {
			miss = append(miss, "p99 worse")
		}
		if len(miss) > 0 {
			misses++
			verdict = "MISS " + strings.Join(miss, ", ")
		}
		fmt.Fprintf(w, "%s\tknit/CoreDNS\t%.2fx\t\t\t\t%.2fx less CPU\t\tp99 %.2fx CoreDNS's\t\t%s\n", set, ratio, cpuRatio, p99k/p99c, verdict)
		b.ReportMetric(ratio, set+"-qps-ratio")
	}
	w.Flush()
	for _, s := range servers {
		mib := func(k string) float64 { return float64(s.mem[k]) / (1 << 20) }
		fmt.Fprintf(&sb, "%s: RSS %.1f MiB after the runs (anonymous %.1f, file-backed %.1f; peak %.1f MiB); UDP receive buffer %d KiB\n",
			s.name, mib("VmRSS"), mib("RssAnon"), mib("RssFile"), mib("VmHWM"), s.rcvbuf>>10)
		b.ReportMetric(mib("VmRSS"), s.name+"-rss-MiB")
	}
	fmt.Fprintf(&sb, "target: >= %.1fx CoreDNS queries/s with p99 no worse; %d of 2 name sets miss\n", dnsTargetRatio, misses)
	fmt.Fprintf(&sb, "fixed rate = min(%d, %.0f%% of CoreDNS's max qps in the round), %d alternating runs of %d s per server and round; CPU us/query = the server's user+system time / answers, core busy = that time / the run's wall time, both in the max-rate runs\n",
		dnsFixedQPS, 100*dnsFixedShare, dnsLatencySlices, max(2, secs/dnsLatencySlices))
	var cmds []string
	for _, r := range runs {
		if r.round == 0 && r.server == servers[0].name {
			cmds = append(cmds, r.command)
		}
	}
	fmt.Fprintf(&sb, "commands (knit; CoreDNS is the same with -s %s):\n  %s\n", dnsCoreDNSAddr, strings.Join(cmds, "\n  "))
	return sb.String()
}
