package overlay

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// TestKernelBenchmark measures, in the sandbox lab, pod-to-pod TCP
// throughput over VXLAN and over direct routes (iperf3, one stream, same
// pod MTU for both), and the time from a new node's agent starting to the
// first TCP connection from another node's pod to a pod on it. It loads
// both cores for about 30 s, so it only runs with KNIT_OVERLAY_BENCH=1.
func TestKernelBenchmark(t *testing.T) {
	if os.Getenv("KNIT_OVERLAY_BENCH") != "1" {
		t.Skip("set KNIT_OVERLAY_BENCH=1 to run the overlay benchmark")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Skip("iperf3 not installed")
	}
	l := newLab(t)
	n1, n2 := l.addNode(1, "198.18.0.1"), l.addNode(2, "198.18.0.2")

	gbps := map[Backend]float64{}
	// Alternate the backends and keep each one's best run: the machine is
	// shared, and load from elsewhere only ever lowers a result.
	for _, b := range []Backend{BackendVXLAN, BackendDirect, BackendVXLAN, BackendDirect, BackendVXLAN, BackendDirect} {
		l.start(n1, b)
		l.start(n2, b)
		// The previous backend's route may still answer: wait for this one's.
		l.eventually(string(b)+" route", 10*time.Second, func() bool {
			return (routeDev(t, n1, podIP(2, v4)) == "eth0") == (b == BackendDirect) &&
				(routeDev(t, n2, podIP(1, v4)) == "eth0") == (b == BackendDirect)
		})
		l.reaches(n1, n2, v4)
		g := iperf(t, n1, n2)
		gbps[b] = max(gbps[b], g)
		t.Logf("%-6s %.2f Gbit/s", b, g)
		n1.stop()
		n2.stop()
	}
	t.Logf("VXLAN / direct = %.2f (target >= 0.9)", gbps[BackendVXLAN]/gbps[BackendDirect])

	// Convergence: n3's topology and Node object exist; its agent starts;
	// how long until n1's pod connects to n3's pod?
	l.start(n1, BackendVXLAN)
	l.start(n2, BackendVXLAN)
	l.reaches(n1, n2, v4)
	n3 := l.addNode(3, "198.18.0.3")
	var ln net.Listener
	mustDo(t, ns.WithNetNSPath("/run/netns/"+n3.pod, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(podIP(3, v4), "0"))
		return err
	}))
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	start := time.Now()
	l.start(n3, BackendVXLAN)
	var took time.Duration
	mustDo(t, ns.WithNetNSPath("/run/netns/"+n1.pod, func(ns.NetNS) error {
		for time.Since(start) < 10*time.Second {
			c, err := net.DialTimeout("tcp", ln.Addr().String(), 50*time.Millisecond)
			if err == nil {
				took = time.Since(start)
				c.Close()
				return nil
			}
			time.Sleep(5 * time.Millisecond)
		}
		return context.DeadlineExceeded
	}))
	t.Logf("new node -> first connection from a peer's pod: %v (target <= 1 s)", took.Round(time.Millisecond))
}

func iperf(t *testing.T, client, server *labNode) float64 {
	t.Helper()
	srv := exec.Command("ip", "netns", "exec", server.pod, "iperf3", "-s", "-1", "-B", podIP(server.n, v4))
	mustDo(t, srv.Start())
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	var out []byte
	var err error
	for range 20 { // until the server listens
		time.Sleep(100 * time.Millisecond)
		out, err = exec.Command("ip", "netns", "exec", client.pod, "iperf3", "-c", podIP(server.n, v4), "-t", "5", "-J").Output()
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("iperf3: %v\n%s", err, out)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	mustDo(t, json.Unmarshal(out, &r))
	return r.End.SumReceived.BitsPerSecond / 1e9
}
