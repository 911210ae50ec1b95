package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"knit.dev/knit/lab/echo"
)

// Demo brings up a 3-node lab, runs an echo pod on every node behind a
// Service, shows traffic crossing nodes (pod to pod, through the Service,
// by DNS name) and tears everything down. It returns an error if any hop
// fails, so it doubles as a smoke test.
func Demo(ctx context.Context, w io.Writer, log *slog.Logger) error {
	fmt.Fprintln(w, "== knit demo: bringing up a 3-node lab cluster (real etcd, kube-apiserver, kube-controller-manager)")
	start := time.Now()
	c, err := Up(ctx, Options{Nodes: 3, Log: log})
	if err != nil {
		return err
	}
	defer func() {
		c.Down()
		fmt.Fprintln(w, "== lab torn down")
	}()
	fmt.Fprintf(w, "   up in %v\n", time.Since(start).Round(100*time.Millisecond))
	for _, n := range c.Nodes {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "   %-6s underlay %-12s podCIDR %s\n", n.Name, n.IP, node.Spec.PodCIDR)
	}

	const ns = "demo"
	if err := c.EnsureNamespace(ctx, ns); err != nil {
		return err
	}
	fmt.Fprintln(w, "== one echo pod per node, and a Service in front of them")
	var pods []*corev1.Pod
	for _, n := range c.Nodes {
		p := EchoPod(ns, "echo-"+n.Name, n.Name, map[string]string{"app": "echo"})
		if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, EchoService(ns, "echo", "echo"), metav1.CreateOptions{})
	if err != nil {
		return err
	}
	for _, n := range c.Nodes {
		p, err := c.WaitPodRunning(ctx, ns, "echo-"+n.Name, true, 60*time.Second)
		if err != nil {
			return err
		}
		pods = append(pods, p)
		fmt.Fprintf(w, "   pod %-12s on %-6s IP %s\n", p.Name, n.Name, p.Status.PodIP)
	}
	fmt.Fprintf(w, "   service echo ClusterIP %s\n", svc.Spec.ClusterIP)

	client := pods[0]
	fmt.Fprintf(w, "== pod to pod, from %s on %s, across nodes\n", client.Name, client.Spec.NodeName)
	hc := HTTPClientFrom(PodNetns(client), 3*time.Second)
	for _, p := range pods {
		r, err := getEcho(ctx, hc, net.JoinHostPort(p.Status.PodIP, fmt.Sprint(echo.HTTPPort)))
		if err != nil {
			return fmt.Errorf("pod %s -> pod %s: %w", client.Name, p.Name, err)
		}
		fmt.Fprintf(w, "   -> %-15s answered by %-12s on %-6s (saw client %s)\n", p.Status.PodIP, r.Pod, r.Node, r.Client)
	}

	// The pods are Ready; their endpoints reach the EndpointSlice (the
	// controller manager) and the proxies (knit's sync loop) a moment later.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		ips, err := c.ReadyEndpointIPs(ctx, ns, "echo")
		return err == nil && len(ips) == len(pods), nil
	})
	if err != nil {
		return fmt.Errorf("service echo never had %d ready endpoints", len(pods))
	}
	time.Sleep(500 * time.Millisecond) // knit's proxy: at most one sync interval behind
	fmt.Fprintln(w, "== through the Service ClusterIP, 12 new connections, spread over the endpoints")
	seen := map[string]int{}
	for range 12 {
		r, err := getEcho(ctx, hc, svc.Spec.ClusterIP+":80")
		if err != nil {
			return fmt.Errorf("pod -> Service %s: %w", svc.Spec.ClusterIP, err)
		}
		seen[r.Pod+" on "+r.Node]++
	}
	for _, k := range slices.Sorted(maps.Keys(seen)) {
		fmt.Fprintf(w, "   %d x %s\n", seen[k], k)
	}

	fmt.Fprintln(w, "== by name, with the pod's resolv.conf (search path, ndots:5)")
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", strings.TrimPrefix(PodNetns(client), "/run/netns/"),
		c.KnitBinary(), "lab", "get", "http://echo/").CombinedOutput()
	if err != nil {
		return fmt.Errorf("pod -> http://echo/: %v: %s", err, out)
	}
	var r echo.Reply
	if err := json.Unmarshal(out, &r); err != nil {
		return fmt.Errorf("pod -> http://echo/: %v: %s", err, out)
	}
	fmt.Fprintf(w, "   http://echo/ answered by %s on %s\n", r.Pod, r.Node)
	fmt.Fprintln(w, "== demo passed: pods reached each other across nodes, through the Service, and by name")
	return nil
}

func getEcho(ctx context.Context, c *http.Client, hostport string) (echo.Reply, error) {
	var r echo.Reply
	resp, err := c.Get("http://" + hostport + "/")
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&r)
	return r, err
}
