package overlay

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// scalePeers is how many peer Nodes BenchmarkKernelScale programs
// (KNIT_OVERLAY_SCALE_PEERS overrides): the Kubernetes scalability
// threshold of 5,000 nodes, less this one.
const scalePeers = 4999

// BenchmarkKernelScale programs one node's overlay (real netlink, in a
// throwaway netns of the sandbox) for a cluster of 5,000 nodes, and times
// what an operator of a large cluster waits for:
//
//   - start: the agent starts with 4,999 peers already in its cache
//     (Node objects with podCIDRs and the annotations their agents
//     publish); time until every peer's FDB entry, neighbour and route
//     are in the kernel, and the first sync's duration;
//   - resync: the timer's level-triggered sync with nothing to change
//     (every peer diffed against three kernel dumps): its duration, and
//     that it changes nothing;
//   - one node added, and one deleted: from the API write to the route
//     appearing or going, while 4,999 others are programmed;
//   - restart: a new agent over the programmed kernel: time to ready and
//     the kernel changes it made (should be none).
//
// VXLAN backend; peers' underlay addresses need not exist (FDB entries
// only name them). No anchor runs beside it: the lab has no second overlay
// to compare with, so it prints absolute numbers.
//
//	go test -run '^$' -bench BenchmarkKernelScale -benchtime 1x ./overlay/
func BenchmarkKernelScale(b *testing.B) {
	peers := scalePeers
	if v := os.Getenv("KNIT_OVERLAY_SCALE_PEERS"); v != "" {
		if _, err := fmt.Sscan(v, &peers); err != nil || peers < 1 || peers > 60000 {
			b.Fatalf("KNIT_OVERLAY_SCALE_PEERS=%q: want 1-60000", v)
		}
	}
	l := newLab(b)
	l.syncPeriod = 5 * time.Second
	l.configure = func(c *Config) {
		c.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
		c.Masquerade = false // nftables is not what is measured
	}
	n1 := l.addNode(1, "198.18.0.1")
	ctx := context.Background()
	nodes := l.client.CoreV1().Nodes()
	// The lab's node has a dual-stack podCIDR; at this scale only IPv4.
	if self, err := nodes.Get(ctx, n1.name, metav1.GetOptions{}); err == nil {
		self.Spec.PodCIDRs = self.Spec.PodCIDRs[:1]
		if _, err := nodes.Update(ctx, self, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	for i := range peers {
		if _, err := nodes.Create(ctx, scalePeer(i), metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	want := peers

	b.ResetTimer()
	started := time.Now()
	l.start(n1, BackendVXLAN)
	l.eventually("every peer programmed", 5*time.Minute, func() bool {
		return metricSum(n1.reg, "knit_overlay_peers_programmed") >= float64(want)
	})
	programmed := time.Since(started)
	startSyncs, startTotal := syncStats(n1)
	routes := scaleRoutes(b, n1)

	// Resyncs with nothing to change: three timer syncs.
	changesBefore := changes(n1)
	l.eventually("three timer resyncs", time.Minute, func() bool {
		c, _ := syncStats(n1)
		return c >= startSyncs+3
	})
	endSyncs, endTotal := syncStats(n1)
	resyncChanges := changes(n1) - changesBefore

	// One node added, one deleted.
	added := time.Now()
	if _, err := nodes.Create(ctx, scalePeer(peers), metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	newCIDR := scalePeer(peers).Spec.PodCIDR
	l.eventually("the added node's route", 10*time.Second, func() bool { return scaleHasRoute(n1, newCIDR) })
	addTook := time.Since(added)
	deleted := time.Now()
	if err := nodes.Delete(ctx, scalePeer(0).Name, metav1.DeleteOptions{}); err != nil {
		b.Fatal(err)
	}
	goneCIDR := scalePeer(0).Spec.PodCIDR
	l.eventually("the deleted node's route gone", 10*time.Second, func() bool { return !scaleHasRoute(n1, goneCIDR) })
	delTook := time.Since(deleted)

	// Restart over the programmed kernel.
	n1.stop()
	restarted := time.Now()
	l.start(n1, BackendVXLAN)
	l.eventually("ready after restart", 5*time.Minute, func() bool { return n1.o.Ready() })
	restartReady := time.Since(restarted)
	restartChanges := changes(n1)
	b.StopTimer()

	var out strings.Builder
	fmt.Fprintf(&out, "\nBenchmarkKernelScale: one node's VXLAN overlay with %d peers (%s)\n", peers, overlayScaleMachine())
	fmt.Fprintf(&out, "  start -> every peer programmed: %v (%d sync(s), mean %s; %d routes in the kernel)\n",
		programmed.Round(time.Millisecond), startSyncs, mean(startSyncs, startTotal), routes)
	fmt.Fprintf(&out, "  timer resync, nothing to change: mean %s over %d, kernel changes %v\n",
		mean(endSyncs-startSyncs, endTotal-startTotal), endSyncs-startSyncs, resyncChanges)
	fmt.Fprintf(&out, "  node added -> its route: %v; node deleted -> route gone: %v\n",
		addTook.Round(time.Millisecond), delTook.Round(time.Millisecond))
	fmt.Fprintf(&out, "  agent restart -> ready: %v, kernel changes %v\n", restartReady.Round(time.Millisecond), restartChanges)
	fmt.Print(out.String())
	b.ReportMetric(programmed.Seconds(), "start-s")
	b.ReportMetric(float64(addTook.Milliseconds()), "add-ms")
}

// scalePeer is peer i: podCIDR 10.(100+i/250).(i%250).0/24, underlay
// address 100.64.(i/250).(i%250+1), annotated as its agent would publish.
func scalePeer(i int) *corev1.Node {
	hi, lo := i/250, i%250
	ip := fmt.Sprintf("100.64.%d.%d", hi, lo+1)
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("peer-%d", i),
			Annotations: map[string]string{
				AnnotationPublicIP: ip,
				AnnotationVTEPMAC:  fmt.Sprintf("0e:00:%02x:%02x:%02x:01", i>>16&0xff, i>>8&0xff, i&0xff),
			},
		},
		Spec:   corev1.NodeSpec{PodCIDR: fmt.Sprintf("10.%d.%d.0/24", 100+hi, lo), PodCIDRs: []string{fmt.Sprintf("10.%d.%d.0/24", 100+hi, lo)}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

func scaleRoutes(b *testing.B, n *labNode) int {
	out, ok := try(in(n.ns, "ip", "route", "show", "proto", "75")...)
	if !ok {
		b.Fatalf("ip route: %s", out)
	}
	return strings.Count(out, "\n")
}

func scaleHasRoute(n *labNode, cidr string) bool {
	out, _ := try(in(n.ns, "ip", "route", "show", "exact", cidr)...)
	return strings.Contains(out, "knit-vx4")
}

// syncStats is the node's sync histogram: how many syncs, and their total.
func syncStats(n *labNode) (count int, total time.Duration) {
	mfs, _ := n.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "knit_overlay_sync_duration_seconds" {
			for _, m := range mf.GetMetric() {
				h := m.GetHistogram()
				count += int(h.GetSampleCount())
				total += time.Duration(h.GetSampleSum() * float64(time.Second))
			}
		}
	}
	return count, total
}

// mean is total/count, rounded.
func mean(count int, total time.Duration) string {
	if count == 0 {
		return "-"
	}
	return (total / time.Duration(count)).Round(100 * time.Microsecond).String()
}

func overlayScaleMachine() string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	l, _ := os.ReadFile("/proc/loadavg")
	return fmt.Sprintf("%s, kernel %s, load %s", time.Now().UTC().Format("2006-01-02 15:04 MST"),
		strings.TrimSpace(string(kernel)), strings.Join(strings.Fields(string(l))[:3], " "))
}
