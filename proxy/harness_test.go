package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/knftables"
)

// Test topology: this node is node-a (zone-a), 198.18.0.1; node-b is
// another node. Pods are in 10.42.0.0/16, Services in 10.43.0.0/16.
const (
	thisNode  = "node-a"
	otherNode = "node-b"
	nodeIP    = "198.18.0.1"
	nodeIP6   = "fd00:198:18::1"
)

func testConfig() Config {
	return Config{
		NodeName:        thisNode,
		NodeIPs:         []netip.Addr{netip.MustParseAddr(nodeIP), netip.MustParseAddr(nodeIP6)},
		ClusterCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16"), netip.MustParsePrefix("fd42::/56")},
		ServiceCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.43.0.0/16"), netip.MustParsePrefix("fd43::/112")},
		LocalServiceIPs: []netip.Addr{netip.MustParseAddr("10.43.0.10")},
		MinSyncPeriod:   time.Millisecond,
		// Harness tests drive syncs themselves; TestNewServiceHoldOff
		// tests the wait.
		NewServiceHoldOff: time.Millisecond,
	}
}

// harness runs the real constructor on a fake clientset and informers, with
// knftables' fake (or a real nft) as the kernel. Syncs are driven by the
// test, not by the loop, so that every step is deterministic.
type harness struct {
	t      testing.TB
	client *fake.Clientset
	p      *Proxier
	nft    knftables.Interface
	fake   *knftables.Fake
	ct     *fakeConntrack
	reg    *prometheus.Registry
	cancel context.CancelFunc

	hcMu    sync.Mutex
	hcAddrs map[string]string // healthCheckNodePort address -> test address
}

type fakeConntrack struct {
	calls []map[family]*staleUDPFilter
	last  map[family]*staleUDPFilter
}

func (f *fakeConntrack) deleteUDP(fam family, flt *staleUDPFilter) (uint, error) {
	if f.last == nil {
		f.last = map[family]*staleUDPFilter{}
	}
	f.last[fam] = flt
	return 0, nil
}

func newHarness(t testing.TB, cfg Config, nft knftables.Interface, objs ...runtime.Object) *harness {
	t.Helper()
	h := &harness{t: t, client: fake.NewClientset(objs...), ct: &fakeConntrack{}, reg: prometheus.NewRegistry()}
	if nft == nil {
		h.fake = knftables.NewFake(knftables.InetFamily, tableName)
		nft = h.fake
	}
	h.nft = nft
	factory := informers.NewSharedInformerFactory(h.client, 0)
	src := Sources{
		Services:       factory.Core().V1().Services(),
		EndpointSlices: factory.Discovery().V1().EndpointSlices(),
		Nodes:          factory.Core().V1().Nodes(),
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	h.hcAddrs = map[string]string{}
	listen := func(network, addr string) (net.Listener, error) {
		// Health check servers listen on a free loopback port instead of
		// the healthCheckNodePort; tests find it in hcAddrs.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			h.hcMu.Lock()
			h.hcAddrs[addr] = ln.Addr().String()
			h.hcMu.Unlock()
		}
		return ln, err
	}
	p, err := newProxier(cfg, src, h.reg, log, deps{nft: nft, ct: h.ct, listen: listen})
	if err != nil {
		t.Fatalf("newProxier: %v", err)
	}
	h.p = p
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	t.Cleanup(cancel)
	factory.Start(ctx.Done())
	deadline := time.Now().Add(10 * time.Second)
	for !p.allSynced() {
		if time.Now().After(deadline) {
			t.Fatal("informers did not sync")
		}
		time.Sleep(time.Millisecond)
	}
	return h
}

// objects lists the harness's API objects (Services, EndpointSlices) and
// this node: what a fresh harness needs to render the same state.
func (h *harness) objects() []runtime.Object {
	var objs []runtime.Object
	svcs, _ := h.client.CoreV1().Services("").List(context.Background(), metav1.ListOptions{})
	for i := range svcs.Items {
		objs = append(objs, &svcs.Items[i])
	}
	sl, _ := h.client.DiscoveryV1().EndpointSlices("").List(context.Background(), metav1.ListOptions{})
	for i := range sl.Items {
		objs = append(objs, &sl.Items[i])
	}
	return append(objs, node(thisNode, "zone-a", nodeIP, nodeIP6))
}

// sync runs one sync (full the first time) and fails the test on error.
func (h *harness) sync() {
	h.t.Helper()
	if _, err := h.p.syncOnce(context.Background()); err != nil {
		h.t.Fatalf("sync: %v", err)
	}
}

// do runs a change through the API and waits until the proxy's handlers
// have recorded it (they ask for a sync).
func (h *harness) do(change func(ctx context.Context) error) {
	h.t.Helper()
	select {
	case <-h.p.kick:
	default:
	}
	if err := change(context.Background()); err != nil {
		h.t.Fatalf("api change: %v", err)
	}
	select {
	case <-h.p.kick:
	case <-time.After(10 * time.Second):
		h.t.Fatal("the proxy did not see the change")
	}
}

func (h *harness) addService(s *corev1.Service) {
	h.do(func(ctx context.Context) error {
		_, err := h.client.CoreV1().Services(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		return err
	})
}

func (h *harness) updateService(s *corev1.Service) {
	h.do(func(ctx context.Context) error {
		_, err := h.client.CoreV1().Services(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
}

func (h *harness) deleteService(ns, name string) {
	h.do(func(ctx context.Context) error {
		return h.client.CoreV1().Services(ns).Delete(ctx, name, metav1.DeleteOptions{})
	})
}

func (h *harness) addSlice(s *discoveryv1.EndpointSlice) {
	h.do(func(ctx context.Context) error {
		_, err := h.client.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		return err
	})
}

func (h *harness) updateSlice(s *discoveryv1.EndpointSlice) {
	h.do(func(ctx context.Context) error {
		_, err := h.client.DiscoveryV1().EndpointSlices(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
		return err
	})
}

func (h *harness) deleteSlice(ns, name string) {
	h.do(func(ctx context.Context) error {
		return h.client.DiscoveryV1().EndpointSlices(ns).Delete(ctx, name, metav1.DeleteOptions{})
	})
}

// --- object builders ---

type svcOpt func(*corev1.Service)

func service(ns, name, clusterIP string, opts ...svcOpt) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  clusterIP,
			ClusterIPs: []string{clusterIP},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func withPorts(ports ...corev1.ServicePort) svcOpt {
	return func(s *corev1.Service) { s.Spec.Ports = ports }
}

func withClusterIPs(ips ...string) svcOpt {
	return func(s *corev1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = ips[0], ips }
}

func withNodePort(np int32) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeNodePort
		for i := range s.Spec.Ports {
			s.Spec.Ports[i].NodePort = np + int32(i)
		}
	}
}

func withLoadBalancer(np, hc int32, ips ...string) svcOpt {
	return func(s *corev1.Service) {
		withNodePort(np)(s)
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.HealthCheckNodePort = hc
		for _, ip := range ips {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
		}
	}
}

func withExternalIPs(ips ...string) svcOpt {
	return func(s *corev1.Service) { s.Spec.ExternalIPs = ips }
}

func withETPLocal(s *corev1.Service) {
	s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
}

func withITPLocal(s *corev1.Service) {
	p := corev1.ServiceInternalTrafficPolicyLocal
	s.Spec.InternalTrafficPolicy = &p
}

func withAffinity(seconds int32) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &seconds}}
	}
}

type ep struct {
	ip          string
	node        string
	notReady    bool
	terminating bool
	notServing  bool
	zones       []string
	nodes       []string
}

type sliceOpt func(*discoveryv1.EndpointSlice)

func slice(ns, svc, name string, port int32, eps []ep, opts ...sliceOpt) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name,
			Labels: map[string]string{discoveryv1.LabelServiceName: svc},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(port), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for _, e := range eps {
		if netip.MustParseAddr(e.ip).Is6() {
			s.AddressType = discoveryv1.AddressTypeIPv6
		}
		de := discoveryv1.Endpoint{
			Addresses: []string{e.ip},
			Conditions: discoveryv1.EndpointConditions{
				Ready:       ptr(!e.notReady && !e.terminating),
				Serving:     ptr(!e.notServing),
				Terminating: ptr(e.terminating),
			},
		}
		if e.node != "" {
			de.NodeName = ptr(e.node)
		}
		if len(e.zones) > 0 || len(e.nodes) > 0 {
			de.Hints = &discoveryv1.EndpointHints{}
			for _, z := range e.zones {
				de.Hints.ForZones = append(de.Hints.ForZones, discoveryv1.ForZone{Name: z})
			}
			for _, n := range e.nodes {
				de.Hints.ForNodes = append(de.Hints.ForNodes, discoveryv1.ForNode{Name: n})
			}
		}
		s.Endpoints = append(s.Endpoints, de)
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func withSlicePorts(ports ...discoveryv1.EndpointPort) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.Ports = ports }
}

// udpSlice is the EndpointSlice of the UDP Service ns1/name: port "dns"
// on 5353 at each of ips, all on the other node.
func udpSlice(name string, ips ...string) *discoveryv1.EndpointSlice {
	var list []ep
	for _, ip := range ips {
		list = append(list, ep{ip: ip, node: otherNode})
	}
	return slice("ns1", name, name+"-1", 5353, list,
		withSlicePorts(discoveryv1.EndpointPort{Name: ptr("dns"), Port: ptr(int32(5353)), Protocol: ptr(corev1.ProtocolUDP)}))
}

func withTrigger(t time.Time) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) {
		s.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: t.Format(time.RFC3339Nano)}
	}
}

func node(name, zone string, addrs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelTopologyZone: zone}}}
	for _, a := range addrs {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: a})
	}
	return n
}

func ptr[T any](v T) *T { return &v }

func eps(n int, prefix string, nodeName string) []ep {
	out := make([]ep, n)
	for i := range out {
		out[i] = ep{ip: fmt.Sprintf("%s.%d", prefix, i+1), node: nodeName}
	}
	return out
}
