package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/lab/sandbox"
)

// The ingress benchmark's setup, all in one lab node's netns:
//
//	sandbox root: wrk (taskset core 1) --underlay--> 198.18.0.1
//	netns node1:  :80   knit agent (its ingress), GOMAXPROCS=1, core 0
//	              :8088 nginx, 1 worker, no master, core 0
//	                 \-- both, keep-alive --> echo pods (cni0), core 1
//
// Both proxies have the same routes to the same two echo pods, send the
// same X-Forwarded-*/X-Request-Id headers and keep upstream connections
// alive (knit: 128 per endpoint, its default; nginx: keepalive 256 for the
// upstream of two). The agent is restarted with GOMAXPROCS=1 for the run:
// one core is what both are given, and it is what Go's container-aware
// default picks under a one-CPU limit.
const (
	ingBenchNode      = 0 // index into the lab's nodes: node1
	ingBenchNS        = "bench-ingress"
	ingBenchPods      = 2
	ingBenchNginxPort = 8088
	ingBenchProxyCPU  = "0"
	ingBenchLoadCPU   = "1"
	ingBenchConns     = 64
	ingBenchRounds    = 4 // per table size and proxy, alternating which goes first
	ingBenchDuration  = 10 * time.Second
	ingBenchWarmup    = 3 * time.Second
	ingBenchRules     = 1000 // the big table: hosts h0000..h0999, in Ingresses of ingBenchPerIngress rules
	ingBenchPerIng    = 10
	ingBenchPath      = "/api/v1/items?id=42"
)

// Targets (DESIGN.md): knit >= 1.0x nginx's requests/s, p99 <= 1.5x nginx's.
const (
	ingTargetRPS = 1.0
	ingTargetP99 = 1.5
)

// BenchmarkIngress measures knit's ingress against nginx, side by side in
// one lab: requests/s, p50/p99 latency (wrk) and CPU time per request
// (/proc/<pid>/stat utime+stime over the run) of each proxy process, with
// one Ingress rule and with 1,000 (nginx: 1,000 server blocks). Rounds
// alternate which proxy goes first, so that load from elsewhere on the
// machine hits both alike; the table shows every round and the medians.
// It does its fixed workload once whatever b.N is (use -benchtime 1x),
// fails when a proxy answers with errors, and reports missed targets
// without failing. -short runs one 5 s round per size.
//
//	go test -run '^$' -bench BenchmarkIngress -benchtime 1x ./bench/
func BenchmarkIngress(b *testing.B) {
	sandbox.Require(b)
	for _, tool := range []string{"nginx", "wrk", "taskset"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s is needed (hack/deps.sh installs it): %v", tool, err)
		}
	}
	ctx := context.Background()
	began := time.Now()
	rounds, dur := ingBenchRounds, ingBenchDuration
	if testing.Short() {
		rounds, dur = 1, 5*time.Second
	}

	ib := ingBenchSetup(ctx, b)
	defer ib.close()
	setup := time.Since(began)
	b.ResetTimer()

	var results []ingResult
	for _, size := range []int{1, ingBenchRules} {
		if size > 1 {
			ib.addRules(ctx, b, size)
		}
		host := "bench.example"
		if size > 1 {
			host = ingBenchHost(size / 2)
		}
		ib.startNginx(b, size, host)
		for _, p := range []string{"knit", "nginx"} { // warm-up: pools, caches, CPU frequency
			if _, err := ib.wrk(p, host, ingBenchWarmup); err != nil {
				b.Fatalf("warm-up %s: %v", p, err)
			}
		}
		for i := range rounds {
			order := []string{"knit", "nginx"}
			if i%2 == 1 {
				slices.Reverse(order)
			}
			for _, p := range order {
				r, err := ib.wrk(p, host, dur)
				if err != nil {
					b.Fatalf("%s, %d rules, round %d: %v", p, size, i+1, err)
				}
				r.rules, r.round = size, i+1
				results = append(results, r)
				if r.errors != "" {
					b.Errorf("%s, %d rules, round %d: wrk saw errors: %s", p, size, i+1, r.errors)
				}
			}
		}
		ib.stopNginx()
	}
	b.StopTimer()

	table := ingReport(b, results, rounds, dur, setup, time.Since(began))
	fmt.Println(table)
	if err := os.WriteFile(filepath.Join(ib.dir, "results.txt"), []byte(table+"\n"), 0o644); err != nil {
		b.Error(err)
	}
}

// ingBench is the running setup.
type ingBench struct {
	c        *lab.Cluster
	node     *lab.Node
	dir      string
	eps      []string // echo pod IP:port
	agentPID int
	nginx    *exec.Cmd
	log      *os.File
}

func ingBenchHost(i int) string { return fmt.Sprintf("h%04d.bench.example", i) }

// ingBenchSetup brings up a one-node lab, two echo pods behind a Service
// and an Ingress for bench.example, restarts the node's agent with
// GOMAXPROCS=1 and pins it to the proxy core and the pods to the load core.
func ingBenchSetup(ctx context.Context, b *testing.B) *ingBench {
	b.Helper()
	cacheDir, err := lab.CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	ib := &ingBench{dir: filepath.Join(cacheDir, "bench", "ingress")}
	_ = os.RemoveAll(ib.dir)
	if err := os.MkdirAll(filepath.Join(ib.dir, "nginx", "tmp"), 0o755); err != nil {
		b.Fatal(err)
	}
	built, err := lab.BuildKnit(ctx, cacheDir)
	if err != nil {
		b.Fatal(err)
	}
	// A private copy: someone else's rebuild cannot swap it mid-run.
	knit := filepath.Join(ib.dir, "knit")
	if err := copyExecutable(built, knit); err != nil {
		b.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ib.c, err = lab.Up(ctx, lab.Options{Nodes: 1, WorkDir: filepath.Join(ib.dir, "lab"), KnitBinary: knit, Log: log})
	if err != nil {
		b.Fatal(err)
	}
	ok := false
	defer func() {
		if !ok {
			ib.close()
		}
	}()
	ib.node = ib.c.Nodes[ingBenchNode]
	c := ib.c
	if err := c.EnsureNamespace(ctx, ingBenchNS); err != nil {
		b.Fatal(err)
	}
	var pods []string
	for i := range ingBenchPods {
		name := fmt.Sprintf("echo-%d", i)
		if _, err := c.Client.CoreV1().Pods(ingBenchNS).Create(ctx, lab.EchoPod(ingBenchNS, name, ib.node.Name, map[string]string{"app": "echo"}), metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		pods = append(pods, name)
	}
	for _, name := range pods {
		if _, err := c.WaitPodRunning(ctx, ingBenchNS, name, true, 90*time.Second); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := c.Client.CoreV1().Services(ingBenchNS).Create(ctx, lab.EchoService(ingBenchNS, "echo", "echo"), metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		ips, err := c.ReadyEndpointIPs(ctx, ingBenchNS, "echo")
		if err != nil || len(ips) != ingBenchPods {
			return false, nil
		}
		ib.eps = nil
		for _, ip := range ips {
			ib.eps = append(ib.eps, fmt.Sprintf("%s:%d", ip, echo.HTTPPort))
		}
		return true, nil
	})
	if err != nil {
		b.Fatalf("echo Service never had %d ready endpoints", ingBenchPods)
	}
	slices.Sort(ib.eps)
	ing := &networkingv1.Ingress{
		ObjectMeta: metav1.ObjectMeta{Name: "bench", Namespace: ingBenchNS},
		Spec:       networkingv1.IngressSpec{Rules: []networkingv1.IngressRule{ingBenchRule("bench.example")}},
	}
	if _, err := c.Client.NetworkingV1().Ingresses(ingBenchNS).Create(ctx, ing, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}

	// Restart the agent with one P: StartAgent passes this process's
	// environment on.
	ib.node.StopAgent()
	os.Setenv("GOMAXPROCS", "1")
	err = ib.node.StartAgent()
	os.Unsetenv("GOMAXPROCS")
	if err != nil {
		b.Fatal(err)
	}
	if err := ib.node.WaitAgentReady(ctx, 2*time.Minute); err != nil {
		b.Fatal(err)
	}
	// `ip netns exec` execs the agent in place: the pid is the agent's.
	ib.agentPID = ib.node.AgentPID()
	if comm := ingComm(ib.agentPID); comm != "knit" {
		b.Fatalf("agent pid %d is %q, not knit", ib.agentPID, comm)
	}
	if err := ingPin(ib.agentPID, ingBenchProxyCPU); err != nil {
		b.Fatal(err)
	}
	for _, name := range pods {
		pids := ingEchoPIDs(name)
		if len(pids) == 0 {
			b.Fatalf("no process found for echo pod %s", name)
		}
		for _, pid := range pids {
			if err := ingPin(pid, ingBenchLoadCPU); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := ib.waitRoute(ctx, "http://"+ib.node.IP+":80", "bench.example"); err != nil {
		b.Fatalf("knit never routed bench.example: %v", err)
	}
	ok = true
	return ib
}

// ingBenchRule routes /api and / of host to the echo Service, as the
// nginx server block for host does.
func ingBenchRule(host string) networkingv1.IngressRule {
	prefix := networkingv1.PathTypePrefix
	path := func(p string) networkingv1.HTTPIngressPath {
		return networkingv1.HTTPIngressPath{Path: p, PathType: &prefix, Backend: networkingv1.IngressBackend{
			Service: &networkingv1.IngressServiceBackend{Name: "echo", Port: networkingv1.ServiceBackendPort{Name: "http"}},
		}}
	}
	return networkingv1.IngressRule{Host: host, IngressRuleValue: networkingv1.IngressRuleValue{
		HTTP: &networkingv1.HTTPIngressRuleValue{Paths: []networkingv1.HTTPIngressPath{path("/api"), path("/")}},
	}}
}

// addRules creates n more host rules in Ingresses of ingBenchPerIng rules
// and waits until knit's table holds them and routes the last one.
func (ib *ingBench) addRules(ctx context.Context, b *testing.B, n int) {
	b.Helper()
	c := ib.c
	for i := 0; i < n; i += ingBenchPerIng {
		ing := &networkingv1.Ingress{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("rules-%04d", i), Namespace: ingBenchNS}}
		for j := i; j < i+ingBenchPerIng && j < n; j++ {
			ing.Spec.Rules = append(ing.Spec.Rules, ingBenchRule(ingBenchHost(j)))
		}
		if _, err := c.Client.NetworkingV1().Ingresses(ingBenchNS).Create(ctx, ing, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	want := 2 * (n + 1) // host/path rules: two paths per host, plus bench.example
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		v, err := ingMetric(ib.node.HealthURL()+"/metrics", "knit_ingress_routes")
		return err == nil && int(v) >= want, nil
	})
	if err != nil {
		b.Fatalf("knit's table never held %d routes", want)
	}
	if err := ib.waitRoute(ctx, "http://"+ib.node.IP+":80", ingBenchHost(n-1)); err != nil {
		b.Fatal(err)
	}
}

// waitRoute waits until base answers host's bench path with 200.
func (ib *ingBench) waitRoute(ctx context.Context, base, host string) error {
	client := &http.Client{Timeout: 2 * time.Second}
	var last error
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		req, _ := http.NewRequestWithContext(ctx, "GET", base+ingBenchPath, nil)
		req.Host = host
		resp, err := client.Do(req)
		if err != nil {
			last = err
			return false, nil
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		last = fmt.Errorf("status %d", resp.StatusCode)
		return resp.StatusCode == 200, nil
	})
	if err != nil {
		return fmt.Errorf("%s Host %s: %v", base, host, last)
	}
	return nil
}

// ingNginxConf is nginx configured as knit is: one upstream of the echo
// endpoints with keep-alive, and for each host a server whose locations
// mirror the Ingress rule's Prefix paths "/api" and "/" (Prefix /api
// matches /api and /api/..., not /apix: "= /api" plus "/api/"). Unknown
// hosts get 404, as from knit without a default backend.
func ingNginxConf(dir string, eps []string, hosts []string) string {
	var sb strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&sb, format+"\n", args...) }
	p("daemon off;")
	p("master_process off;")
	p("worker_processes 1;")
	p("pid %s/nginx.pid;", dir)
	p("error_log %s/error.log warn;", dir)
	p("events { worker_connections 4096; }")
	p("http {")
	p("  access_log off;")
	for _, t := range []string{"client_body", "proxy", "fastcgi", "uwsgi", "scgi"} {
		p("  %s_temp_path %s/tmp/%s;", t, dir, t)
	}
	p("  keepalive_requests 1000000;")
	p("  keepalive_timeout 300s;")
	p("  server_names_hash_max_size 8192;")
	p("  server_names_hash_bucket_size 128;")
	p("  upstream echo {")
	for _, ep := range eps {
		p("    server %s;", ep)
	}
	p("    keepalive %d;", 128*len(eps))
	p("    keepalive_requests 1000000;")
	p("  }")
	p("  server { listen %d default_server backlog=4096; return 404; }", ingBenchNginxPort)
	loc := `proxy_pass http://echo; proxy_http_version 1.1; proxy_set_header Connection ""; ` +
		`proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; ` +
		`proxy_set_header X-Forwarded-Host $host; proxy_set_header X-Forwarded-Proto $scheme; ` +
		`proxy_set_header X-Request-Id $request_id;`
	for _, h := range hosts {
		p("  server {")
		p("    listen %d;", ingBenchNginxPort)
		p("    server_name %s;", h)
		p("    location = /api { %s }", loc)
		p("    location /api/ { %s }", loc)
		p("    location / { %s }", loc)
		p("  }")
	}
	p("}")
	return sb.String()
}

// startNginx writes the config for bench.example plus rules-1 extra hosts
// and starts nginx in the node's netns, pinned to the proxy core.
func (ib *ingBench) startNginx(b *testing.B, rules int, host string) {
	b.Helper()
	dir := filepath.Join(ib.dir, "nginx")
	hosts := []string{"bench.example"}
	if rules > 1 {
		for i := range rules {
			hosts = append(hosts, ingBenchHost(i))
		}
	}
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(ingNginxConf(dir, ib.eps, hosts)), 0o644); err != nil {
		b.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "nginx.out"))
	if err != nil {
		b.Fatal(err)
	}
	// ip execs taskset, which execs nginx: the pid is nginx's.
	cmd := exec.Command("ip", "netns", "exec", ib.node.Name, "taskset", "-c", ingBenchProxyCPU, "nginx", "-p", dir, "-c", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		b.Fatal(err)
	}
	ib.nginx, ib.log = cmd, logf
	if err := ib.waitRoute(context.Background(), fmt.Sprintf("http://%s:%d", ib.node.IP, ingBenchNginxPort), host); err != nil {
		out, _ := os.ReadFile(filepath.Join(dir, "nginx.out"))
		b.Fatalf("nginx: %v\n%s", err, out)
	}
	if comm := ingComm(cmd.Process.Pid); comm != "nginx" {
		b.Fatalf("nginx pid %d is %q", cmd.Process.Pid, comm)
	}
}

func (ib *ingBench) stopNginx() {
	if ib.nginx == nil {
		return
	}
	_ = ib.nginx.Process.Signal(syscall.SIGQUIT)
	done := make(chan struct{})
	go func() { _ = ib.nginx.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = ib.nginx.Process.Kill()
		<-done
	}
	ib.log.Close()
	ib.nginx = nil
}

func (ib *ingBench) close() {
	ib.stopNginx()
	if ib.c != nil {
		ib.c.Down()
	}
}

// ingResult is one wrk run against one proxy.
type ingResult struct {
	proxy        string
	rules, round int
	rps          float64
	p50, p99     time.Duration
	requests     int64
	cpuPerReq    time.Duration // proxy process CPU (user+sys) per request
	proxyBusy    float64       // proxy process CPU / wall, in cores
	core0, core1 ingCore       // the machine's cores over the run
	others       string        // the busiest other processes of the sandbox, in cores
	errors       string
}

// wrk runs wrk from the sandbox root against proxy ("knit" or "nginx")
// with Host host, pinned to the load core, and measures the proxy
// process's CPU time and both cores' load over the run.
func (ib *ingBench) wrk(proxy, host string, d time.Duration) (ingResult, error) {
	r := ingResult{proxy: proxy}
	pid, port := ib.agentPID, 80
	if proxy == "nginx" {
		pid, port = ib.nginx.Process.Pid, ingBenchNginxPort
	}
	url := fmt.Sprintf("http://%s:%d%s", ib.node.IP, port, ingBenchPath)
	cmd := exec.Command("taskset", "-c", ingBenchLoadCPU, "wrk", "-t1", fmt.Sprintf("-c%d", ingBenchConns),
		fmt.Sprintf("-d%ds", int(d.Seconds())), "--latency", "-H", "Host: "+host, url)
	cpu0, err := procCPU(pid)
	if err != nil {
		return r, err
	}
	procs0 := ingSnapshot()
	cores0 := ingReadCores()
	start := time.Now()
	out, err := cmd.CombinedOutput()
	wall := time.Since(start)
	cpu1, cerr := procCPU(pid)
	cores1 := ingReadCores()
	r.others = ingTopOthers(procs0, ingSnapshot(), pid, wall, 3)
	if st := cmd.ProcessState; st != nil { // taskset execs wrk: this is wrk's
		r.others = fmt.Sprintf("wrk %.2f, %s", float64(st.UserTime()+st.SystemTime())/float64(wall), r.others)
	}
	if err != nil {
		return r, fmt.Errorf("wrk: %v\n%s", err, out)
	}
	if cerr != nil {
		return r, cerr
	}
	if err := ingParseWrk(string(out), &r); err != nil {
		return r, fmt.Errorf("%v\n%s", err, out)
	}
	if r.requests > 0 {
		r.cpuPerReq = (cpu1 - cpu0) / time.Duration(r.requests)
	}
	r.proxyBusy = float64(cpu1-cpu0) / float64(wall)
	r.core0, r.core1 = cores1[0].since(cores0[0]), cores1[1].since(cores0[1])
	return r, nil
}

var (
	ingWrkRPS      = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	ingWrkTotal    = regexp.MustCompile(`(\d+) requests in`)
	ingWrkLatency  = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$`)
	ingWrkProblems = regexp.MustCompile(`(?m)^\s*(Socket errors:.*|Non-2xx or 3xx responses:.*)$`)
)

func ingParseWrk(out string, r *ingResult) error {
	m := ingWrkRPS.FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("no Requests/sec in wrk output")
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	if m = ingWrkTotal.FindStringSubmatch(out); m != nil {
		r.requests, _ = strconv.ParseInt(m[1], 10, 64)
	}
	for _, m := range ingWrkLatency.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[m[3]]
		d := time.Duration(v * float64(unit))
		if m[1] == "50" {
			r.p50 = d
		} else {
			r.p99 = d
		}
	}
	if r.p99 == 0 {
		return fmt.Errorf("no latency distribution in wrk output")
	}
	var probs []string
	for _, m := range ingWrkProblems.FindAllStringSubmatch(out, -1) {
		probs = append(probs, strings.TrimSpace(m[1]))
	}
	r.errors = strings.Join(probs, "; ")
	return nil
}

// ingCore is one CPU's time from /proc/stat (the machine's, not the
// sandbox's: it shows load from outside the benchmark too).
type ingCore struct{ busy, steal, total float64 }

func (c ingCore) since(o ingCore) ingCore {
	return ingCore{c.busy - o.busy, c.steal - o.steal, c.total - o.total}
}

func (c ingCore) String() string {
	if c.total <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%/%.0f%%", 100*c.busy/c.total, 100*c.steal/c.total)
}

func ingReadCores() [2]ingCore {
	var out [2]ingCore
	f, err := os.Open("/proc/stat")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 9 || (fs[0] != "cpu0" && fs[0] != "cpu1") {
			continue
		}
		var v [8]float64
		for i := range v {
			v[i], _ = strconv.ParseFloat(fs[i+1], 64)
		}
		// user nice system idle iowait irq softirq steal
		idle := v[3] + v[4]
		total := v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7]
		out[fs[0][3]-'0'] = ingCore{busy: total - idle, steal: v[7], total: total}
	}
	return out
}

// ingSnapshot is the CPU time of every process in the sandbox (its own pid
// namespace: other engineers' processes are not in it; their load shows in
// the cores' busy time).
func ingSnapshot() map[int]ingProc {
	out := map[int]ingProc{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if cpu, err := procCPU(pid); err == nil {
			out[pid] = ingProc{comm: ingComm(pid), cpu: cpu}
		}
	}
	return out
}

type ingProc struct {
	comm string
	cpu  time.Duration
}

// ingTopOthers names the n processes besides skip that used the most CPU
// between two snapshots, as "comm cores".
func ingTopOthers(before, after map[int]ingProc, skip int, wall time.Duration, n int) string {
	type use struct {
		name  string
		cores float64
	}
	var us []use
	for pid, a := range after {
		b, ok := before[pid]
		if pid == skip || !ok || a.comm != b.comm {
			continue
		}
		if d := a.cpu - b.cpu; d > 0 {
			us = append(us, use{a.comm, float64(d) / float64(wall)})
		}
	}
	slices.SortFunc(us, func(x, y use) int {
		switch {
		case x.cores > y.cores:
			return -1
		case x.cores < y.cores:
			return 1
		}
		return strings.Compare(x.name, y.name)
	})
	var parts []string
	for _, u := range us[:min(n, len(us))] {
		parts = append(parts, fmt.Sprintf("%s %.2f", u.name, u.cores))
	}
	return strings.Join(parts, ", ")
}

// ingPin sets the CPU affinity of every thread of pid.
func ingPin(pid int, cpu string) error {
	out, err := exec.Command("taskset", "-a", "-p", "-c", cpu, strconv.Itoa(pid)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("taskset %d: %v: %s", pid, err, out)
	}
	return nil
}

func ingComm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

// ingEchoPIDs finds the echo workload processes of a pod: the lab kubelet
// runs `<knit> lab echo --pod <name> ...` in the pod's netns.
func ingEchoPIDs(pod string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if i := slices.Index(args, "echo"); i > 0 && args[i-1] == "lab" {
			if j := slices.Index(args, "--pod"); j > 0 && j+1 < len(args) && args[j+1] == pod {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// ingMetric reads one unlabelled metric from a Prometheus text page.
func ingMetric(url, name string) (float64, error) {
	resp, err := (&http.Client{Timeout: 3 * time.Second}).Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("%s not in %s", name, url)
}

// ingReport prints every round and the medians per table size, the
// knit/nginx ratios and the verdict against the targets, and reports the
// medians as benchmark metrics.
func ingReport(b *testing.B, rs []ingResult, rounds int, dur, setup, wall time.Duration) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Ingress: wrk -t1 -c%d -d%v keep-alive, GET %s; proxies on core %s, wrk and echo pods on core %s\n",
		ingBenchConns, dur, ingBenchPath, ingBenchProxyCPU, ingBenchLoadCPU)
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "rules\tround\tproxy\treq/s\tp50\tp99\tCPU us/req\tproxy cores\tcore0 busy/steal\tcore1 busy/steal\tbusiest others in the sandbox (cores)\t")
	for _, r := range rs {
		fmt.Fprintf(w, "%d\t%d\t%s\t%.0f\t%v\t%v\t%.1f\t%.2f\t%v\t%v\t%s\t\n", r.rules, r.round, r.proxy, r.rps,
			ingRound(r.p50), ingRound(r.p99), ingUS(r.cpuPerReq), r.proxyBusy, r.core0, r.core1, r.others)
	}
	w.Flush()
	fmt.Fprintln(&sb, "medians and knit/nginx ratios (req/s: higher is better; p99 and CPU: lower is better)")
	w = tabwriter.NewWriter(&sb, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "rules\tknit req/s\tnginx req/s\tratio\tknit p99\tnginx p99\tratio\tknit us/req\tnginx us/req\tratio\tper-core capacity\tverdict\t")
	misses, unsaturated := 0, false
	for _, size := range []int{1, ingBenchRules} {
		med := func(proxy string, f func(ingResult) float64) float64 {
			var v []float64
			for _, r := range rs {
				if r.rules == size && r.proxy == proxy {
					v = append(v, f(r))
				}
			}
			return median(v)
		}
		rps := func(r ingResult) float64 { return r.rps }
		p99 := func(r ingResult) float64 { return float64(r.p99) }
		cpu := func(r ingResult) float64 { return float64(r.cpuPerReq) }
		kr, nr := med("knit", rps), med("nginx", rps)
		kp, np := med("knit", p99), med("nginx", p99)
		kc, nc := med("knit", cpu), med("nginx", cpu)
		busy := max(med("knit", func(r ingResult) float64 { return r.proxyBusy }), med("nginx", func(r ingResult) float64 { return r.proxyBusy }))
		if kr == 0 || nr == 0 || kc == 0 {
			continue
		}
		if busy < 0.95 {
			unsaturated = true
		}
		var miss []string
		if kr/nr < ingTargetRPS {
			miss = append(miss, fmt.Sprintf("req/s < %.1fx", ingTargetRPS))
		}
		if kp/np > ingTargetP99 {
			miss = append(miss, fmt.Sprintf("p99 > %.1fx", ingTargetP99))
		}
		verdict := "ok"
		if len(miss) > 0 {
			misses++
			verdict = "MISS " + strings.Join(miss, ", ")
		}
		fmt.Fprintf(w, "%d\t%.0f\t%.0f\t%.2fx\t%v\t%v\t%.2fx\t%.1f\t%.1f\t%.2fx\t%.2fx\t%s\t\n", size, kr, nr, kr/nr,
			ingRound(time.Duration(kp)), ingRound(time.Duration(np)), kp/np,
			ingUS(time.Duration(kc)), ingUS(time.Duration(nc)), kc/nc, nc/kc, verdict)
		tag := fmt.Sprintf("rules%d-", size)
		b.ReportMetric(kr, tag+"knit-req/s")
		b.ReportMetric(nr, tag+"nginx-req/s")
		b.ReportMetric(kr/nr, tag+"req/s-ratio")
		b.ReportMetric(kp/np, tag+"p99-ratio")
		b.ReportMetric(kc/nc, tag+"cpu/req-ratio")
	}
	w.Flush()
	if unsaturated {
		fmt.Fprintln(&sb, "NOTE: the proxies' core was not saturated (proxy cores < 0.95) but the load core was: req/s and p99 "+
			"then compare the proxies at the same offered load, and per-core capacity (nginx CPU per request / knit's) "+
			"is the estimate of requests/s per core.")
	}
	fmt.Fprintf(&sb, "targets: knit >= %.1fx nginx req/s, p99 <= %.1fx nginx's; %d of 2 table sizes miss. %d rounds per size; "+
		"proxy cores = proxy CPU time / wall (1.00: its core saturated); core busy/steal from /proc/stat (whole machine); "+
		"knit's CPU is the whole agent (all components, GOMAXPROCS=1). Setup %v, wall %v.",
		ingTargetRPS, ingTargetP99, misses, rounds, setup.Round(time.Second), wall.Round(time.Second))
	return sb.String()
}

func ingUS(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func ingRound(d time.Duration) time.Duration {
	switch {
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}

func TestIngParseWrk(t *testing.T) {
	const out = `Running 10s test @ http://198.18.0.1:80/api/v1/items?id=42
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.90ms    1.20ms   1.02s    90.00%
    Req/Sec    22.35k     1.00k   24.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    3.00ms
     90%    4.00ms
     99%    1.50s
  223500 requests in 10.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  22350.00
Transfer/sec:      6.00MB
`
	var r ingResult
	if err := ingParseWrk(out, &r); err != nil {
		t.Fatal(err)
	}
	if r.rps != 22350 || r.requests != 223500 || r.p50 != 812*time.Microsecond || r.p99 != 1500*time.Millisecond {
		t.Errorf("parsed %+v", r)
	}
	if r.errors != "Socket errors: connect 0, read 2, write 0, timeout 1; Non-2xx or 3xx responses: 3" {
		t.Errorf("errors %q", r.errors)
	}
	if err := ingParseWrk("unable to connect", &r); err == nil {
		t.Error("no error for output without results")
	}
}
