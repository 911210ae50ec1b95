package e2e

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
)

// TestAgentRestartKeepsTraffic restarts the agent on the client's node
// while requests flow through a ClusterIP and to a pod on another node:
// the data plane must stay up (no request fails) and the agent must come
// back Ready.
func TestAgentRestartKeepsTraffic(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "restart-e2e")
	ctx := context.Background()
	backends := echoPods(t, c, ns, "rs", c.Nodes[1].Name, c.Nodes[2].Name)
	client := echoPods(t, c, ns, "rsclient", c.Nodes[0].Name)[0]
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, lab.EchoService(ns, "rs", "rs"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitEndpoints(t, c, ns, "rs", 2)
	if err := eventually(5*time.Second, func() error {
		_, err := httpEcho(lab.PodNetns(client), hostport(svc.Spec.ClusterIP, 80))
		return err
	}); err != nil {
		t.Fatal(err)
	}

	var ok, failed atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		targets := []string{hostport(svc.Spec.ClusterIP, 80), hostport(backends[0].Status.PodIP, 8080)}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := httpEcho(lab.PodNetns(client), targets[i%2]); err != nil {
				failed.Add(1)
				t.Logf("request %d to %s failed: %v", i, targets[i%2], err)
			} else {
				ok.Add(1)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	time.Sleep(500 * time.Millisecond)
	node := c.Nodes[0]
	node.StopAgent()
	time.Sleep(2 * time.Second) // the agent is down: the kernel keeps forwarding
	if err := node.StartAgent(); err != nil {
		t.Fatal(err)
	}
	if err := node.WaitAgentReady(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	close(stop)
	<-done
	t.Logf("%d requests succeeded, %d failed across the restart", ok.Load(), failed.Load())
	if failed.Load() > 0 || ok.Load() < 50 {
		t.Errorf("agent restart: %d requests failed, %d succeeded; want 0 failed", failed.Load(), ok.Load())
	}
}
