// Package lab brings up a small but real Kubernetes cluster with knit as its
// network, entirely inside a private network sandbox (package lab/sandbox):
// the basis of every end-to-end test, of the demo and of the benchmarks.
//
//	sandbox root netns (no uplink)
//	  knitu0 bridge 198.18.0.254/24 -- etcd, kube-apiserver, kube-controller-manager (lab/cp)
//	    |-- veth --> netns node1 (eth0 198.18.0.1): knit agent, simulated kubelet
//	    |                 cni0 -- veth --> netns pod-xxxx (echo workload)
//	    |-- veth --> netns node2 (eth0 198.18.0.2): ...
//	    `-- ...
//
// Nodes are registered as Node objects (InternalIP, Ready) and
// kube-controller-manager assigns their podCIDRs. Each node runs two
// processes of the knit binary: `knit agent` and `knit lab kubelet` (package
// lab/kubelet), both inside the node's netns via `ip netns exec`, which also
// gives them the netns's view of /sys.
//
// Nothing here may run outside the sandbox: Up refuses to.
package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/lab/cp"
	"knit.dev/knit/lab/sandbox"
	"knit.dev/knit/status"
)

// Lab addresses (DESIGN.md).
const (
	UnderlayBridge  = "knitu0"
	UnderlayGateway = "198.18.0.254"
	ClusterCIDR     = "10.42.0.0/16"
	ServiceCIDR     = "10.43.0.0/16"
	ClusterDNS      = "10.43.0.10"
	ClusterDomain   = "cluster.local"
	AgentHealthPort = 9940
)

// CNI plugin choices for the lab's nodes.
const (
	CNIKnit      = "knit"
	CNIReference = "reference" // bridge + host-local + portmap v1.9.1
)

// Options describe a lab cluster.
type Options struct {
	Nodes    int    // default 3
	WorkDir  string // per-cluster scratch dir (default <cache>/lab/work)
	CacheDir string // build cache (default <repo>/.cache)
	// KnitBinary is the knit build to run; empty builds one into the cache.
	KnitBinary string
	// CNI selects the plugin: CNIKnit (default) or CNIReference.
	CNI string
	// AgentArgs are extra flags for every node's `knit agent`.
	AgentArgs []string
	// Components is the agent's --components value (default: all but
	// "cni" when CNI is CNIReference).
	Components string
	// Topology is the underlay: TopologyFlat (default, one subnet) or
	// TopologyTwoSubnets (see topology.go).
	Topology string
	Log      *slog.Logger
}

// Cluster is a running lab.
type Cluster struct {
	opts   Options
	CP     *cp.ControlPlane
	Client kubernetes.Interface
	Config *rest.Config
	Nodes  []*Node
	log    *slog.Logger

	stopUpstream func()
}

// Node is one lab node: a netns on the underlay, its Node object, its
// agent and kubelet processes.
type Node struct {
	Name  string
	IP    string
	Dir   string
	Index int

	cluster *Cluster
	agent   *exec.Cmd
	kubelet *exec.Cmd
}

// RepoRoot finds the knit repository root (the directory holding the go.mod
// of module knit.dev/knit), from $KNIT_REPO or by walking up from the
// working directory.
func RepoRoot() (string, error) {
	if r := os.Getenv("KNIT_REPO"); r != "" {
		return r, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(b, []byte("module knit.dev/knit\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("knit repository root not found (set KNIT_REPO)")
		}
		dir = parent
	}
}

// CacheDir is where builds and lab state live: $KNIT_CACHE or <repo>/.cache.
func CacheDir() (string, error) {
	if c := os.Getenv("KNIT_CACHE"); c != "" {
		return c, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache"), nil
}

// releaseBuild is how the lab builds Go binaries: as releases are built
// (hack/image; containernetworking/plugins' build_linux.sh), static and
// stripped. A dynamically linked binary pays the loader on every exec,
// which for a CNI plugin is a measurable part of each ADD and DEL.
func releaseBuild(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-ldflags=-s -w"}, args...)...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	return cmd
}

// BuildKnit builds the knit binary into <cache>/bin/knit, and beside it
// knit-cni, the plugin-only build the agent installs as the CNI plugin.
func BuildKnit(ctx context.Context, cacheDir string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(cacheDir, "bin", "knit")
	for _, b := range []struct{ out, pkg string }{{out, "."}, {out + "-cni", "./cni/cmd/knit-cni"}} {
		cmd := releaseBuild(ctx, "-o", b.out, b.pkg)
		cmd.Dir = root
		if o, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build %s: %v\n%s", b.pkg, err, o)
		}
	}
	return out, nil
}

// BuildReferencePlugins builds the reference CNI plugins (the benchmark
// baseline) at the version pinned in go.mod into <cache>/bin/cni-ref. They
// are go.mod `tool` entries, which keeps their own dependencies in go.mod
// and go.sum through `go mod tidy`.
func BuildReferencePlugins(ctx context.Context, cacheDir string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cacheDir, "bin", "cni-ref")
	cmd := releaseBuild(ctx, "-o", dir+"/",
		"github.com/containernetworking/plugins/plugins/main/bridge",
		"github.com/containernetworking/plugins/plugins/ipam/host-local",
		"github.com/containernetworking/plugins/plugins/meta/portmap",
		"github.com/containernetworking/plugins/plugins/main/loopback")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build reference CNI plugins: %v\n%s", err, b)
	}
	return dir, nil
}

// Up starts a lab cluster. It must run inside the sandbox.
func Up(ctx context.Context, opts Options) (*Cluster, error) {
	if !sandbox.InSandbox() {
		return nil, errors.New("lab: refusing to run outside the network sandbox")
	}
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.CNI == "" {
		opts.CNI = CNIKnit
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	var err error
	if opts.CacheDir == "" {
		if opts.CacheDir, err = CacheDir(); err != nil {
			return nil, err
		}
	}
	if opts.WorkDir == "" {
		opts.WorkDir = filepath.Join(opts.CacheDir, "lab", "work")
	}
	_ = os.RemoveAll(opts.WorkDir)
	if err := os.MkdirAll(opts.WorkDir, 0o755); err != nil {
		return nil, err
	}
	if opts.KnitBinary == "" {
		if opts.KnitBinary, err = BuildKnit(ctx, opts.CacheDir); err != nil {
			return nil, err
		}
	}
	cpBin, err := cp.Build(ctx, opts.CacheDir)
	if err != nil {
		return nil, err
	}
	c := &Cluster{opts: opts, log: opts.Log}
	if c.stopUpstream, err = startUpstreamDNS(); err != nil {
		return nil, fmt.Errorf("upstream DNS: %w", err)
	}
	c.CP, err = cp.Start(ctx, cp.Options{
		Dir:              filepath.Join(opts.WorkDir, "controlplane"),
		BinPath:          cpBin,
		AdvertiseAddress: UnderlayGateway,
		ServiceCIDR:      ServiceCIDR,
		ClusterCIDR:      ClusterCIDR,
		NodeCIDRMaskSize: 24,
	})
	if err != nil {
		return nil, fmt.Errorf("control plane: %w", err)
	}
	if err := c.setupTopology(ctx); err != nil {
		c.Down()
		return nil, err
	}
	c.Config = c.CP.RestConfig()
	if c.Client, err = kubernetes.NewForConfig(c.Config); err != nil {
		c.Down()
		return nil, err
	}
	// The namespace of knit's node status Leases (the DaemonSet's, in a
	// real cluster), before the agents start publishing.
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: status.DefaultNamespace}}, metav1.CreateOptions{}); err != nil {
		c.Down()
		return nil, fmt.Errorf("namespace %s: %w", status.DefaultNamespace, err)
	}
	for i := 1; i <= opts.Nodes; i++ {
		if _, err := c.AddNode(ctx, i); err != nil {
			c.Down()
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
	}
	if err := c.createClusterServices(ctx); err != nil {
		c.Down()
		return nil, err
	}
	for _, n := range c.Nodes {
		if err := n.WaitAgentReady(ctx, 2*time.Minute); err != nil {
			c.Down()
			return nil, err
		}
	}
	return c, nil
}

// createClusterServices creates the kube-dns Service that a standard
// kubelet's --cluster-dns points at (knit answers its IP on every node).
func (c *Cluster) createClusterServices(ctx context.Context) error {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: "kube-system",
			Labels: map[string]string{"k8s-app": "kube-dns"}},
		Spec: corev1.ServiceSpec{
			ClusterIP: ClusterDNS,
			Selector:  map[string]string{"k8s-app": "kube-dns"},
			Ports: []corev1.ServicePort{
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
				{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP},
			},
		},
	}
	if _, err := c.Client.CoreV1().Services("kube-system").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return err
	}
	class := &networkingv1.IngressClass{
		ObjectMeta: metav1.ObjectMeta{Name: "knit", Annotations: map[string]string{
			networkingv1.AnnotationIsDefaultIngressClass: "true",
		}},
		Spec: networkingv1.IngressClassSpec{Controller: "knit.dev/ingress"},
	}
	_, err := c.Client.NetworkingV1().IngressClasses().Create(ctx, class, metav1.CreateOptions{})
	return err
}

// AddNode creates node i (198.18.0.i, or 198.19.0.i for an even i in
// TopologyTwoSubnets): its netns, its Node object, and starts its agent and
// kubelet.
func (c *Cluster) AddNode(ctx context.Context, i int) (*Node, error) {
	ul := c.underlayFor(i)
	n := &Node{
		Name:    fmt.Sprintf("node%d", i),
		IP:      ul.IP,
		Index:   i,
		Dir:     filepath.Join(c.opts.WorkDir, fmt.Sprintf("node%d", i)),
		cluster: c,
	}
	for _, d := range []string{"state", "run", "net.d", "bin", "cni-cache"} {
		if err := os.MkdirAll(filepath.Join(n.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	host := fmt.Sprintf("n%d-u", i)
	steps := [][]string{
		{"netns", "add", n.Name},
		{"link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", n.Name},
		{"link", "set", host, "master", ul.Bridge, "up"},
		{"-n", n.Name, "link", "set", "lo", "up"},
		{"-n", n.Name, "addr", "add", n.IP + "/24", "dev", "eth0"},
		{"-n", n.Name, "link", "set", "eth0", "up"},
		{"-n", n.Name, "route", "add", "default", "via", ul.Gateway},
	}
	for _, r := range ul.Routes {
		steps = append(steps, append([]string{"-n", n.Name, "route", "add"}, r...))
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, "ip", s...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	if err := c.registerNode(ctx, n); err != nil {
		return nil, err
	}
	if c.opts.CNI == CNIReference {
		if err := c.installReferenceCNI(ctx, n); err != nil {
			return nil, err
		}
	}
	if err := n.StartAgent(); err != nil {
		return nil, err
	}
	if err := n.startKubelet(); err != nil {
		return nil, err
	}
	c.Nodes = append(c.Nodes, n)
	return n, nil
}

// registerNode creates the Node object with its InternalIP and a Ready
// condition, and waits for kube-controller-manager to give it a podCIDR.
func (c *Cluster) registerNode(ctx context.Context, n *Node) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{
		"kubernetes.io/hostname":      n.Name,
		"kubernetes.io/os":            "linux",
		"topology.kubernetes.io/zone": fmt.Sprintf("zone-%c", 'a'+(n.Index-1)%2),
	}}}
	created, err := c.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	// kube-controller-manager may write the Node (podCIDR) at any moment
	// after Create: update the status on the latest version.
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		latest, err := c.Client.CoreV1().Nodes().Get(ctx, created.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		latest.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.IP},
			{Type: corev1.NodeHostName, Address: n.Name},
		}
		latest.Status.Conditions = []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}}
		_, err = c.Client.CoreV1().Nodes().UpdateStatus(ctx, latest, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return got.Spec.PodCIDR != "", nil
	})
}

// Register creates the node's Node object again, after a test deleted it,
// as a kubelet registers its node when it starts (InternalIP, Ready), and
// waits for kube-controller-manager to give it a podCIDR.
func (n *Node) Register(ctx context.Context) error { return n.cluster.registerNode(ctx, n) }

// installReferenceCNI writes the reference bridge + host-local + portmap
// conflist for the node once its podCIDR is known.
func (c *Cluster) installReferenceCNI(ctx context.Context, n *Node) error {
	binDir, err := BuildReferencePlugins(ctx, c.opts.CacheDir)
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(binDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.Symlink(filepath.Join(binDir, e.Name()), filepath.Join(n.Dir, "bin", e.Name())); err != nil && !os.IsExist(err) {
			return err
		}
	}
	node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "reference",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true, "mtu": 1450,
     "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}`, filepath.Join(n.Dir, "state", "host-local"), node.Spec.PodCIDR)
	return os.WriteFile(filepath.Join(n.Dir, "net.d", "10-reference.conflist"), []byte(conf), 0o644)
}

// Kubeconfig is the admin kubeconfig path.
func (c *Cluster) Kubeconfig() string { return c.CP.Kubeconfig() }

// KnitBinary is the knit build the lab runs.
func (c *Cluster) KnitBinary() string { return c.opts.KnitBinary }

// Down stops every process and removes the lab's network namespaces. The
// sandbox itself disappears when its process tree exits.
func (c *Cluster) Down() {
	for _, n := range c.Nodes {
		n.stop(n.kubelet)
		n.stop(n.agent)
	}
	if c.CP != nil {
		c.CP.Stop()
	}
	if c.stopUpstream != nil {
		c.stopUpstream()
	}
	// Pod and node netns are bind mounts in the sandbox's private /run.
	if entries, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range entries {
			_ = exec.Command("ip", "netns", "del", e.Name()).Run()
		}
	}
}

// agentArgs builds the node's `knit agent` command line.
func (n *Node) agentArgs() []string {
	c := n.cluster
	comps := c.opts.Components
	if comps == "" {
		comps = "cni,overlay,proxy,dns,ingress"
		if c.opts.CNI == CNIReference {
			comps = "overlay,proxy,dns,ingress"
		}
	}
	args := []string{"netns", "exec", n.Name, c.opts.KnitBinary, "agent",
		"--node-name", n.Name,
		"--kubeconfig", c.Kubeconfig(),
		"--components", comps,
		"--health-addr", n.IP + ":" + strconv.Itoa(AgentHealthPort),
		"--state-dir", filepath.Join(n.Dir, "state"),
		"--run-dir", filepath.Join(n.Dir, "run"),
		"--cni-conf-dir", filepath.Join(n.Dir, "net.d"),
		"--cni-bin-dir", filepath.Join(n.Dir, "bin"),
		"--cluster-cidr", ClusterCIDR,
		"--service-cidr", ServiceCIDR,
		"--cluster-dns", ClusterDNS,
		"--dns-upstream", UpstreamAddr,
	}
	return append(args, c.opts.AgentArgs...)
}

// StartAgent starts the node's knit agent (again, after StopAgent).
func (n *Node) StartAgent() error {
	cmd, err := n.spawn("agent", n.agentArgs())
	if err != nil {
		return err
	}
	n.agent = cmd
	return nil
}

// StopAgent stops the agent with SIGTERM, as a DaemonSet rollout would.
func (n *Node) StopAgent() { n.stop(n.agent); n.agent = nil }

// KillAgent stops the agent with SIGKILL (crash).
func (n *Node) KillAgent() {
	if n.agent != nil && n.agent.Process != nil {
		_ = n.agent.Process.Signal(syscall.SIGKILL)
		_ = n.agent.Wait()
	}
	n.agent = nil
}

// AgentPID is the agent process id, or 0 when it is not running.
func (n *Node) AgentPID() int {
	if n.agent == nil || n.agent.Process == nil {
		return 0
	}
	return n.agent.Process.Pid
}

func (n *Node) startKubelet() error {
	c := n.cluster
	args := []string{"netns", "exec", n.Name, c.opts.KnitBinary, "lab", "kubelet",
		"--node-name", n.Name,
		"--node-ip", n.IP,
		"--kubeconfig", c.Kubeconfig(),
		"--cni-conf-dir", filepath.Join(n.Dir, "net.d"),
		"--cni-bin-dir", filepath.Join(n.Dir, "bin"),
		"--cni-cache-dir", filepath.Join(n.Dir, "cni-cache"),
		"--cluster-dns", ClusterDNS,
		"--cluster-domain", ClusterDomain,
		"--workload", c.opts.KnitBinary + " lab echo",
	}
	cmd, err := n.spawn("kubelet", args)
	if err != nil {
		return err
	}
	n.kubelet = cmd
	return nil
}

// spawn starts `ip args...` with output appended to <node dir>/<name>.log.
func (n *Node) spawn(name string, args []string) (*exec.Cmd, error) {
	logf, err := os.OpenFile(filepath.Join(n.Dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s on %s: %w", name, n.Name, err)
	}
	go func() { _ = cmd.Wait(); logf.Close() }()
	return cmd, nil
}

func (n *Node) stop(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		for cmd.ProcessState == nil {
			if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
	}
}

// HealthURL is the node agent's health/metrics base URL.
func (n *Node) HealthURL() string {
	return "http://" + n.IP + ":" + strconv.Itoa(AgentHealthPort)
}

// WaitAgentReady waits until the agent's /readyz answers 200.
func (n *Node) WaitAgentReady(ctx context.Context, timeout time.Duration) error {
	client := &http.Client{Timeout: time.Second}
	var last string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		resp, err := client.Get(n.HealthURL() + "/readyz")
		if err != nil {
			last = err.Error()
			return false, nil
		}
		defer resp.Body.Close()
		b := new(bytes.Buffer)
		_, _ = b.ReadFrom(resp.Body)
		last = strings.TrimSpace(b.String())
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		return fmt.Errorf("agent on %s not ready after %v: %s (log: %s)", n.Name, timeout, last, filepath.Join(n.Dir, "agent.log"))
	}
	return nil
}

// Exec runs a command in the node's netns and returns its combined output.
func (n *Node) Exec(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	return string(out), err
}

// Node returns the lab node by name.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// IPReserved reports whether ip is held in the node's knit IPAM store.
func (n *Node) IPReserved(ip string) bool {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return false
	}
	store, err := ipam.Open(plugin.IPAMDir(filepath.Join(n.Dir, "state")), "knit", ipam.Options{})
	if err != nil {
		return false
	}
	st, err := store.View()
	if err != nil {
		return false
	}
	for _, r := range st.Reservations {
		if slices.Contains(r.IPs, addr) {
			return true
		}
	}
	return false
}
