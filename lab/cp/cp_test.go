package cp

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"knit.dev/knit/lab/sandbox"
)

const envSkip = "KNIT_SKIP_CONTROLPLANE"

func TestMain(m *testing.M) {
	// Build before entering the sandbox: it has no route to the module
	// proxy, and a cold module cache needs one. Inside, Build finds the
	// binary fresh and returns at once.
	if !sandbox.InSandbox() && os.Getenv(envSkip) != "1" && sandbox.Available() == nil {
		if _, err := Build(context.Background(), ""); err != nil {
			fmt.Fprintln(os.Stderr, "building the control plane:", err)
			os.Exit(1)
		}
	}
	sandbox.Main(m)
}

func TestControlPlane(t *testing.T) {
	if os.Getenv(envSkip) == "1" {
		t.Skip(envSkip + "=1")
	}
	sandbox.Require(t)
	ctx := t.Context()

	bin, err := Build(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	dir := os.Getenv("KNIT_CP_DIR") // set to keep the logs and etcd data
	if dir == "" {
		dir = t.TempDir()
	}
	start := time.Now()
	c, err := Start(ctx, Options{Dir: dir, BinPath: bin})
	if err != nil {
		dumpLogs(t, dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Stop()
		if t.Failed() {
			dumpLogs(t, dir)
		}
	})
	t.Logf("control plane ready in %s", time.Since(start).Round(time.Millisecond))

	cs, err := kubernetes.NewForConfig(c.RestConfig())
	if err != nil {
		t.Fatal(err)
	}

	// nodeipam assigns a podCIDR to a Node created without one.
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}
	if _, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	clusterCIDR := netip.MustParsePrefix("10.42.0.0/16")
	created := time.Now()
	var podCIDR string
	for podCIDR == "" {
		if time.Since(created) > 30*time.Second {
			t.Fatal("no podCIDR assigned to node-1 within 30s")
		}
		time.Sleep(100 * time.Millisecond)
		n, err := cs.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		podCIDR = n.Spec.PodCIDR
	}
	p, err := netip.ParsePrefix(podCIDR)
	if err != nil || p.Bits() != 24 || !clusterCIDR.Contains(p.Addr()) {
		t.Fatalf("podCIDR %q is not a /24 in %s (err %v)", podCIDR, clusterCIDR, err)
	}
	t.Logf("podCIDR %s assigned %s after the Node was created", podCIDR, time.Since(created).Round(time.Millisecond))

	// The API server allocates ClusterIPs from the service range.
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	got, err := cs.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(got.Spec.ClusterIP)
	if err != nil || !netip.MustParsePrefix("10.43.0.0/16").Contains(ip) {
		t.Fatalf("ClusterIP %q not in 10.43.0.0/16 (err %v)", got.Spec.ClusterIP, err)
	}

	// The endpointslice controller, running with its own service account,
	// makes a (still empty) EndpointSlice for the Service.
	waitFor(t, 30*time.Second, "an EndpointSlice for default/web", func() bool {
		l, err := cs.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=web"})
		return err == nil && len(l.Items) > 0
	})

	t.Log("EndpointSlice created")

	// The fault tests' cycle: the API server goes away and comes back on the
	// same etcd with its state.
	c.StopAPIServer()
	t.Log("API server stopped")
	if _, err := cs.CoreV1().Services("default").Get(ctx, "web", metav1.GetOptions{}); err == nil {
		t.Fatal("API server still answers after StopAPIServer")
	}
	restart := time.Now()
	if err := c.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("API server ready again %s after restart", time.Since(restart).Round(time.Millisecond))
	again, err := cs.CoreV1().Services("default").Get(ctx, "web", metav1.GetOptions{})
	if err != nil || again.Spec.ClusterIP != got.Spec.ClusterIP {
		t.Fatalf("after restart: Service %v, err %v; want ClusterIP %s", again, err, got.Spec.ClusterIP)
	}
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %s", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dumpLogs logs the tail of each process log.
func dumpLogs(t *testing.T, dir string) {
	t.Helper()
	for _, name := range []string{Etcd, APIServer, ControllerManager} {
		f, err := os.Open(dir + "/" + name + ".log")
		if err != nil {
			continue
		}
		var lines []string
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			lines = append(lines, sc.Text())
			if len(lines) > 40 {
				lines = lines[1:]
			}
		}
		f.Close()
		t.Logf("--- last lines of %s.log:", name)
		for _, l := range lines {
			t.Log(l)
		}
	}
}
