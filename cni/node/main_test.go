package node

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/lab/sandbox"
)

// TestMain runs the package's tests in the network sandbox: the kernel
// tests (kernel_test.go) need it, the others run there too, harmlessly.
func TestMain(m *testing.M) { sandbox.Main(m) }

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func testNode(name string, podCIDRs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: podCIDRs}}
	if len(podCIDRs) > 0 {
		n.Spec.PodCIDR = podCIDRs[0]
	}
	return n
}

// fakeKernel records what the setup asks of the kernel.
type fakeKernel struct {
	mu         sync.Mutex
	bridgeMTU  map[string]int
	bridgeAddr map[string]map[netip.Prefix]bool
	sysctls    map[string]string
	missing    map[string]bool // sysctls the kernel does not have
	routeMTU   int
	deleted    []string
	failBridge error
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{
		bridgeMTU:  map[string]int{},
		bridgeAddr: map[string]map[netip.Prefix]bool{},
		sysctls:    map[string]string{},
		missing:    map[string]bool{},
	}
}

func (k *fakeKernel) ensureBridge(name string, mtu int, podCIDRs []netip.Prefix, owned func(netip.Prefix) bool) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.failBridge != nil {
		return k.failBridge
	}
	k.bridgeMTU[name] = mtu
	addrs := k.bridgeAddr[name]
	if addrs == nil {
		addrs = map[netip.Prefix]bool{}
		k.bridgeAddr[name] = addrs
	}
	want := map[netip.Prefix]bool{}
	for _, p := range podCIDRs {
		want[netip.PrefixFrom(ipam.Gateway(p), p.Bits())] = true
	}
	for a := range addrs {
		if owned != nil && owned(a) && !want[a] {
			delete(addrs, a)
		}
	}
	for a := range want {
		addrs[a] = true
	}
	return nil
}

func (k *fakeKernel) sysctl(path, value string) (bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.missing[path] {
		return false, &os.PathError{Op: "open", Path: "/proc/sys/" + path, Err: os.ErrNotExist}
	}
	if k.sysctls[path] == value {
		return false, nil
	}
	k.sysctls[path] = value
	return true, nil
}

func (k *fakeKernel) defaultRouteMTU() (int, error) { return k.routeMTU, nil }

func (k *fakeKernel) deleteLink(name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.deleted = append(k.deleted, name)
	return nil
}

// harness is a Setup on fake informers and a fake kernel, with its
// directories under a temporary directory.
type harness struct {
	t       *testing.T
	dir     string
	cfg     Config
	client  *fake.Clientset
	factory informers.SharedInformerFactory
	s       *Setup
	k       *fakeKernel
	reg     *prometheus.Registry
	ctx     context.Context
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newHarness builds the Setup with cfg's directories filled in (unless
// set) and starts the informers with objs in the fake API.
func newHarness(t *testing.T, cfg Config, objs ...runtime.Object) *harness {
	t.Helper()
	dir := t.TempDir()
	if cfg.NodeName == "" {
		cfg.NodeName = "n1"
	}
	set := func(p *string, sub string) {
		if *p == "" {
			*p = filepath.Join(dir, sub)
		}
	}
	set(&cfg.RunDir, "run")
	set(&cfg.StateDir, "state")
	set(&cfg.ConfDir, "net.d")
	set(&cfg.BinDir, "bin")
	h := &harness{t: t, dir: dir, k: newFakeKernel(), reg: prometheus.NewRegistry()}
	h.client = fake.NewClientset(objs...)
	h.factory = informers.NewSharedInformerFactory(h.client, 0)
	s, err := New(cfg, Sources{Nodes: h.factory.Core().V1().Nodes(), Pods: h.factory.Core().V1().Pods()}, h.reg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	s.k = h.k
	s.bootID = func() string { return "test-boot" }
	h.s, h.cfg = s, s.cfg
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	h.ctx = ctx
	h.factory.Start(ctx.Done())
	h.factory.WaitForCacheSync(ctx.Done())
	return h
}

func (h *harness) sync() {
	h.t.Helper()
	if err := h.s.sync(); err != nil {
		h.t.Fatalf("sync: %v", err)
	}
}

func (h *harness) nodeJSONPath() string { return filepath.Join(h.cfg.RunDir, "cni", "node.json") }
func (h *harness) confPath() string     { return filepath.Join(h.cfg.ConfDir, h.cfg.ConfName) }

func (h *harness) read(path string) string {
	h.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		h.t.Fatal(err)
	}
	return string(b)
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// updateNode replaces the Node in the fake API and waits until the
// informer has it.
func (h *harness) updateNode(n *corev1.Node) {
	h.t.Helper()
	if _, err := h.client.CoreV1().Nodes().Update(h.ctx, n, metav1.UpdateOptions{}); err != nil {
		h.t.Fatal(err)
	}
	waitFor(h.t, "node update in the informer", func() bool {
		got, err := h.s.nodes.Get(n.Name)
		return err == nil && got.Spec.PodCIDR == n.Spec.PodCIDR && len(got.Spec.PodCIDRs) == len(n.Spec.PodCIDRs)
	})
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
