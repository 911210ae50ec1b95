package proxy

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// TestKernelTableLoads runs the real sync against the real nft binary in the
// sandbox's fresh network namespace: every Service shape must load, partial
// syncs must apply, stale chains must go away, and a restarted proxier must
// replace the table in place.
func TestKernelTableLoads(t *testing.T) {
	requireSandbox(t)
	nft, lister, err := newNFT()
	if err != nil {
		t.Fatalf("knftables.New: %v", err)
	}
	if lister == nil {
		t.Fatal("no netlink lister")
	}
	cfg := testConfig()
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", tableName).Run() })
	h := newHarness(t, cfg, nft, allShapes()...)
	h.p.backend.lister = lister
	h.sync()
	list := listTable(t)
	if testing.Verbose() {
		t.Logf("table after the first full sync:\n%s", list)
	}
	for _, want := range []string{
		"chain service-v4-ns1/np/tcp/http",
		"chain service-v6-ns1/dual/tcp/http",
		"chain pick-v4-tcp-2",
		"map endpoints-v4-tcp",
		"map endpoints-v6-sctp",
		"10.43.0.20 . tcp . 80 : goto pick-v4-tcp-2",
		"set affinity-v4-ns1/sticky/tcp/http__10.42.1.15/8080",
		"type nat hook prerouting priority dstnat",
		"meta mark & 0x00004000 != 0x00000000 meta mark set meta mark ^ 0x00004000 masquerade fully-random",
	} {
		if !strings.Contains(list, want) {
			t.Errorf("table lacks %q:\n%s", want, list)
		}
	}

	// Partial syncs: add, change and delete.
	h.addService(service("ns2", "new", "10.43.1.1"))
	h.addSlice(slice("ns2", "new", "new-1", 8080, eps(3, "10.42.5", otherNode)))
	// UDP with a map of its own (NodePort, more than inlineEndpointsMax
	// endpoints): the map's type must name UDP, or nft refuses the rule.
	h.addService(service("ns2", "bigudp", "10.43.1.3",
		withPorts(corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}), withNodePort(31003)))
	h.addSlice(slice("ns2", "bigudp", "bigudp-1", 5353, eps(inlineEndpointsMax+2, "10.42.7", otherNode),
		withSlicePorts(discoveryv1.EndpointPort{Name: ptr("dns"), Port: ptr(int32(5353)), Protocol: ptr(corev1.ProtocolUDP)})))
	h.addService(service("ns2", "six", "fd43::66"))
	h.addSlice(slice("ns2", "six", "six-1", 8080, []ep{{ip: "fd42::5:1", node: otherNode}, {ip: "fd42::5:2", node: otherNode}}))
	h.sync()
	list = listTable(t)
	for _, want := range []string{"chain pick-v4-tcp-3", "chain pick-v6-tcp-2", "map service-v4-ns2/bigudp/udp/dns/endpoints", "fd43::66 . 80 . 1 : fd42::5:2 . 8080"} {
		if !strings.Contains(list, want) {
			t.Errorf("partial sync: table lacks %q:\n%s", want, list)
		}
	}
	h.updateSlice(slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.2.15", node: otherNode}}))
	h.sync()
	h.updateSlice(slice("ns2", "new", "new-1", 8080, eps(inlineEndpointsMax+2, "10.42.5", otherNode)))
	h.sync()
	h.updateSlice(slice("ns2", "new", "new-1", 8080, eps(2, "10.42.5", otherNode)))
	h.sync()
	h.updateService(service("ns1", "sticky", "10.43.0.30", withAffinity(30), withITPLocal))
	h.updateSlice(slice("ns1", "sticky", "sticky-1", 8080, []ep{{ip: "10.42.2.15", node: otherNode}, {ip: "10.42.1.15", node: thisNode}}))
	h.sync()
	if list = listTable(t); !strings.Contains(list, "timeout 30s") {
		t.Errorf("affinity timeout not updated:\n%s", list)
	}
	h.deleteService("ns1", "np")
	h.sync()
	list = listTable(t)
	if !strings.Contains(list, "10.43.1.1 . tcp . 80 : goto pick-v4-tcp-2") || !strings.Contains(list, "10.43.1.1 . 80 . 1 : 10.42.5.2 . 8080") {
		t.Errorf("new Service not programmed:\n%s", list)
	}
	if strings.Contains(list, "affinity-v4-ns1/sticky/tcp/http__10.42.2.15/8080") {
		t.Errorf("affinity set of an endpoint no longer reachable (ITP Local) still there")
	}
	if !strings.Contains(list, "chain service-v4-ns1/np/tcp/http") {
		t.Errorf("a deleted Service's chain should linger (flushed) until it is unreferenced")
	}
	time.Sleep(staleChainDelay + 50*time.Millisecond)
	h.sync()
	if list = listTable(t); strings.Contains(list, "ns1/np/") || strings.Contains(list, "pick-v4-tcp-34") {
		t.Errorf("stale chain not deleted:\n%s", list)
	}

	// A restarted knit: a new proxier, same table, full sync in place.
	h2 := newHarness(t, cfg, nft, allShapes()...)
	h2.p.backend.lister = lister
	h2.sync()
	list = listTable(t)
	if !strings.Contains(list, "chain service-v4-ns1/np/tcp/http") || strings.Contains(list, "10.42.5.1") {
		t.Errorf("restart did not converge the table:\n%s", list)
	}
	time.Sleep(staleChainDelay + 50*time.Millisecond)
	h2.sync()
	if list = listTable(t); strings.Contains(list, "ns2/new") || strings.Contains(list, "10.43.1.1 ") {
		t.Errorf("leftover chain of the old process not deleted:\n%s", list)
	}
	// A second full sync on an unchanged table is a no-op that succeeds.
	h2.p.needFull.Store(true)
	h2.sync()
}

func listTable(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("nft", "list", "table", "inet", tableName).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list: %v\n%s", err, out)
	}
	return string(out)
}
