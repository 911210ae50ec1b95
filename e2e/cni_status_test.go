package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/lab"
)

// TestCNIStatusFullPool: a node whose pod address pool is exhausted reports
// CNI STATUS not ready, which the runtime turns into the Node's Ready
// condition (the lab kubelet does what containerd and kubelet do); a new
// pod there does not start; once addresses are free the node is Ready again
// and the pod runs. The pool is filled by reserving its free addresses in
// the node's IPAM store, as if pods held them: reservations without a pod
// identity, which only the runtime's CNI GC may release.
func TestCNIStatusFullPool(t *testing.T) {
	c := cluster(t)
	if os.Getenv("KNIT_LAB_CNI") == lab.CNIReference {
		t.Skip("knit's own STATUS: not the reference plugins'")
	}
	ctx := context.Background()
	n := c.Nodes[len(c.Nodes)-1]
	ns := namespace(t, c, "cni-status")

	nodeReady := func() (*corev1.NodeCondition, error) {
		node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		for i, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				return &node.Status.Conditions[i], nil
			}
		}
		return nil, fmt.Errorf("%s has no Ready condition", n.Name)
	}
	waitReady := func(want corev1.ConditionStatus, msg string) *corev1.NodeCondition {
		t.Helper()
		var last *corev1.NodeCondition
		err := eventually(15*time.Second, func() error {
			cond, err := nodeReady()
			if err != nil {
				return err
			}
			last = cond
			if cond.Status != want || !strings.Contains(cond.Message, msg) {
				return fmt.Errorf("Ready=%s %q", cond.Status, cond.Message)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s never Ready=%s with %q: %v", n.Name, want, msg, err)
		}
		return last
	}
	waitReady(corev1.ConditionTrue, "")

	nodeConf, err := plugin.ReadNodeConfig(filepath.Join(n.Dir, "run"))
	if err != nil {
		t.Fatal(err)
	}
	store, err := ipam.Open(plugin.IPAMDir(filepath.Join(n.Dir, "state")), "knit", ipam.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const fillPrefix = "e2e-fill-"
	release := func() {
		if _, err := store.Retain(func(r ipam.Reservation) bool { return !strings.HasPrefix(r.ContainerID, fillPrefix) }); err != nil {
			t.Errorf("releasing the filler reservations: %v", err)
		}
	}
	t.Cleanup(release) // the node serves the other tests afterwards
	filled := 0
	err = store.Update(func(st *ipam.State) error {
		for i := 0; ; i++ {
			_, err := st.Allocate(ipam.Request{Attachment: ipam.Attachment{ContainerID: fmt.Sprintf("%s%d", fillPrefix, i), IfName: "eth0"}, Now: time.Now()}, nodeConf.PodCIDRs)
			if ipam.IsExhausted(err) {
				return nil
			}
			if err != nil {
				return err
			}
			filled++
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("reserved the %d free addresses of %v on %s", filled, nodeConf.PodCIDRs, n.Name)

	cond := waitReady(corev1.ConditionFalse, "exhausted")
	t.Logf("%s: Ready=%s: %s", n.Name, cond.Status, cond.Message)
	if !strings.Contains(cond.Message, nodeConf.PodCIDRs[0].String()) {
		t.Errorf("the not-ready message does not name the pool %s: %q", nodeConf.PodCIDRs[0], cond.Message)
	}

	// A pod scheduled there cannot get an address.
	pod := lab.EchoPod(ns, "waits", n.Name, map[string]string{"app": "waits"})
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if p, err := c.WaitPodRunning(ctx, ns, "waits", false, 4*time.Second); err == nil {
		t.Fatalf("pod started on a node with an exhausted pool, IP %s", p.Status.PodIP)
	}

	release()
	waitReady(corev1.ConditionTrue, "")
	p, err := c.WaitPodRunning(ctx, ns, "waits", true, 90*time.Second)
	if err != nil {
		t.Fatalf("pod did not start once addresses were free: %v", err)
	}
	if !n.IPReserved(p.Status.PodIP) {
		t.Errorf("pod IP %s is not reserved in %s's store", p.Status.PodIP, n.Name)
	}
}
