package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
)

// outsideNetns is the sandbox root: a client outside the cluster.
const outsideNetns = "/proc/self/ns/net"

// namespace creates a fresh namespace for one test.
func namespace(t *testing.T, c *lab.Cluster, name string) string {
	t.Helper()
	if err := c.EnsureNamespace(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	return name
}

// echoPods creates one echo pod per named node (labels app=<app>) and waits
// for all of them to be Ready.
func echoPods(t *testing.T, c *lab.Cluster, ns, app string, nodes ...string) []*corev1.Pod {
	t.Helper()
	ctx := context.Background()
	var names []string
	for i, n := range nodes {
		name := fmt.Sprintf("%s-%d-%s", app, i, n)
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, lab.EchoPod(ns, name, n, map[string]string{"app": app}), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
	}
	var pods []*corev1.Pod
	for _, name := range names {
		p, err := c.WaitPodRunning(ctx, ns, name, true, 90*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	return pods
}

// createService creates svc and returns it as created (with its ClusterIP
// and node ports).
func createService(t *testing.T, c *lab.Cluster, svc *corev1.Service) *corev1.Service {
	t.Helper()
	s, err := c.Client.CoreV1().Services(svc.Namespace).Create(context.Background(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// waitEndpoints waits until the Service has n ready endpoints.
func waitEndpoints(t *testing.T, c *lab.Cluster, ns, svc string, n int) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		ips, err := c.ReadyEndpointIPs(ctx, ns, svc)
		return err == nil && len(ips) == n, nil
	})
	if err != nil {
		t.Fatalf("Service %s/%s never had %d ready endpoints", ns, svc, n)
	}
}

// httpEcho does GET http://hostport/ from the given netns.
func httpEcho(netns, hostport string) (echo.Reply, error) {
	return httpEchoWith(lab.HTTPClientFrom(netns, 3*time.Second), hostport)
}

// httpEchoWith does GET http://hostport/ with hc (a client kept across
// requests); any status but 200 is an error.
func httpEchoWith(hc *http.Client, hostport string) (echo.Reply, error) {
	var r echo.Reply
	resp, err := hc.Get("http://" + hostport + "/")
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return r, fmt.Errorf("status %d", resp.StatusCode)
	}
	err = json.NewDecoder(resp.Body).Decode(&r)
	return r, err
}

// eventually retries fn for up to d, returning its last error.
func eventually(d time.Duration, fn func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// udpEcho sends msg from netns to addr and returns the reply.
func udpEcho(netns, addr, msg string) (string, error) {
	conn, err := lab.DialFrom(context.Background(), netns, "udp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte(msg)); err != nil {
		return "", err
	}
	buf := make([]byte, 2048)
	n, err := conn.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// inNetns runs a command in a netns (a /run/netns path or name).
func inNetns(ctx context.Context, netns string, args ...string) (string, error) {
	name := strings.TrimPrefix(netns, "/run/netns/")
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", name}, args...)...).CombinedOutput()
	return string(out), err
}

// readAgentMetrics is the node agent's /metrics text.
func readAgentMetrics(n *lab.Node) (string, error) {
	resp, err := (&http.Client{Timeout: 3 * time.Second}).Get(n.HealthURL() + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// agentMetrics is the node agent's /metrics text; the test fails if it
// cannot be read.
func agentMetrics(t *testing.T, n *lab.Node) string {
	t.Helper()
	m, err := readAgentMetrics(n)
	if err != nil {
		t.Fatalf("metrics of %s: %v", n.Name, err)
	}
	return m
}

// agentLog is the path of the node agent's log.
func agentLog(n *lab.Node) string { return filepath.Join(n.Dir, "agent.log") }

func hostport(ip string, port int) string { return net.JoinHostPort(ip, fmt.Sprint(port)) }

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func labEchoService(ns, app string) *corev1.Service { return lab.EchoService(ns, app, app) }
