package ingress

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
)

func fakeService(name string, port int32) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, ResourceVersion: "1"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: port}}},
	}
}

func fakeSlice(svc, addr string) *discoveryv1.EndpointSlice {
	host, port, _ := net.SplitHostPort(addr)
	p, _ := strconv.Atoi(port)
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: svc + "-abc", ResourceVersion: "1",
			Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(p))}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{host}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}},
	}
}

type fakeCluster struct {
	client  *fake.Clientset
	factory informers.SharedInformerFactory
	c       *Controller
	cancel  context.CancelFunc
	done    chan error
}

// fakeSources are the ingress's informer inputs from client, without a
// Client to write status or a Nodes lister.
func fakeSources(client *fake.Clientset) (informers.SharedInformerFactory, Sources) {
	factory := informers.NewSharedInformerFactory(client, 0)
	return factory, Sources{
		Ingresses:      factory.Networking().V1().Ingresses(),
		IngressClasses: factory.Networking().V1().IngressClasses(),
		Services:       factory.Core().V1().Services(),
		EndpointSlices: factory.Discovery().V1().EndpointSlices(),
		Secrets:        factory.Core().V1().Secrets().Informer(),
	}
}

func startFakeCluster(t *testing.T, cfg Config, objs ...runtime.Object) *fakeCluster {
	t.Helper()
	client := fake.NewClientset(objs...)
	factory, src := fakeSources(client)
	src.Client, src.Nodes = client, factory.Core().V1().Nodes()
	cfg.HTTPAddr, cfg.HTTPSAddr = "127.0.0.1:0", "127.0.0.1:0"
	cfg.MinSyncInterval = 10 * time.Millisecond
	c, err := New(cfg, src, prometheus.NewRegistry(), testLogger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	fc := &fakeCluster{client: client, factory: factory, c: c, cancel: cancel, done: make(chan error, 1)}
	factory.Start(ctx.Done())
	go func() { fc.done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-fc.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
		factory.Shutdown()
	})
	eventually(t, "ready", c.Ready)
	return fc
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (fc *fakeCluster) get(host, p string) (int, string) {
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", fc.c.HTTPAddr().String())
	}}, Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + host + p)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Backend") + " " + string(b)
}

// TestControllerFromFakeCache runs the whole component on a fake
// clientset: informers -> table -> listening proxy -> status and Events.
func TestControllerFromFakeCache(t *testing.T) {
	be := newBackend(t, "web")
	ing := newIngress("site", 0, rule("site.com", path("/", prefix, "web"), path("/missing", prefix, "nosuch")))
	ing.ResourceVersion = "1"
	other := newIngress("other-class", 0, rule("other.com", path("/", prefix, "web")))
	other.Spec.IngressClassName = ptr("nginx")
	fc := startFakeCluster(t, Config{NodeName: "node-1", NodeIPs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}},
		knitClass(false), ing, other, fakeService("web", 80), fakeSlice("web", be.hostPort()))
	ctx := context.Background()

	if code, body := fc.get("site.com", "/x"); code != 200 || !strings.HasPrefix(body, "web") {
		t.Fatalf("site.com: %d %s", code, body)
	}
	if code, _ := fc.get("other.com", "/"); code != 404 {
		t.Errorf("Ingress of another class served: %d", code)
	}
	if code, body := fc.get("site.com", "/missing"); code != 503 || !strings.Contains(body, "not found") {
		t.Errorf("unknown Service: %d %s", code, body)
	}

	// Status is written by the Lease holder.
	eventually(t, "status.loadBalancer", func() bool {
		got, err := fc.client.NetworkingV1().Ingresses("default").Get(ctx, "site", metav1.GetOptions{})
		return err == nil && len(got.Status.LoadBalancer.Ingress) == 1 && got.Status.LoadBalancer.Ingress[0].IP == "192.0.2.10"
	})
	got, _ := fc.client.NetworkingV1().Ingresses("default").Get(ctx, "other-class", metav1.GetOptions{})
	if len(got.Status.LoadBalancer.Ingress) != 0 {
		t.Errorf("status written on an Ingress of another class")
	}
	lease, err := fc.client.CoordinationV1().Leases("kube-system").Get(ctx, "knit-ingress-status", metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != "node-1" {
		t.Errorf("lease: %v %+v", err, lease)
	}
	// The problem is an Event on the Ingress.
	eventually(t, "ServiceNotFound event", func() bool {
		evs, _ := fc.client.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		for _, e := range evs.Items {
			if e.Reason == reasonServiceNotFound && e.InvolvedObject.Name == "site" && e.InvolvedObject.Kind == "Ingress" {
				return true
			}
		}
		return false
	})

	// Changes are followed without restart: a new path, a new Service.
	be2 := newBackend(t, "api")
	fc.client.CoreV1().Services("default").Create(ctx, fakeService("api", 80), metav1.CreateOptions{})
	fc.client.DiscoveryV1().EndpointSlices("default").Create(ctx, fakeSlice("api", be2.hostPort()), metav1.CreateOptions{})
	upd := ing.DeepCopy()
	upd.ResourceVersion = "2"
	upd.Spec.Rules[0].HTTP.Paths = append(upd.Spec.Rules[0].HTTP.Paths, path("/api", prefix, "api"))
	if _, err := fc.client.NetworkingV1().Ingresses("default").Update(ctx, upd, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "new path", func() bool {
		code, body := fc.get("site.com", "/api/v1")
		return code == 200 && strings.HasPrefix(body, "api")
	})
	// Endpoints gone: 503, not a stale pod.
	if err := fc.client.DiscoveryV1().EndpointSlices("default").Delete(ctx, "api-abc", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "endpoints removed", func() bool {
		code, _ := fc.get("site.com", "/api/v1")
		return code == 503
	})
	// Our class becomes the default: class-less Ingresses are served.
	classless := newIngress("classless", 3, rule("free.com", path("/", prefix, "web")))
	classless.Spec.IngressClassName = nil
	fc.client.NetworkingV1().Ingresses("default").Create(ctx, classless, metav1.CreateOptions{})
	time.Sleep(100 * time.Millisecond)
	if code, _ := fc.get("free.com", "/"); code != 404 {
		t.Errorf("class-less Ingress served while knit is not the default class: %d", code)
	}
	fc.client.NetworkingV1().IngressClasses().Update(ctx, knitClass(true), metav1.UpdateOptions{})
	eventually(t, "default class", func() bool {
		code, _ := fc.get("free.com", "/")
		return code == 200
	})
}

func fakeNode(name string, ready bool, addrs ...corev1.NodeAddress) *corev1.Node {
	st := corev1.ConditionFalse
	if ready {
		st = corev1.ConditionTrue
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"},
		Status: corev1.NodeStatus{
			Addresses:  addrs,
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: st}},
		},
	}
}

// TestStatusFollowsNodes: status lists every Ready node (ExternalIP over
// InternalIP), follows nodes becoming Ready, and is cleared from an
// Ingress that leaves knit's class.
func TestStatusFollowsNodes(t *testing.T) {
	internal := func(ip string) corev1.NodeAddress {
		return corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip}
	}
	external := func(ip string) corev1.NodeAddress {
		return corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: ip}
	}
	ing := newIngress("site", 0, rule("site.com", path("/", prefix, "web")))
	fc := startFakeCluster(t, Config{NodeName: "n1", NodeIPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}},
		knitClass(false), ing, fakeService("web", 80),
		fakeNode("n1", true, internal("192.0.2.1")),
		fakeNode("n2", true, internal("192.0.2.2"), external("203.0.113.2")),
		fakeNode("n3", false, internal("192.0.2.3")))
	ctx := context.Background()
	status := func() []string {
		got, err := fc.client.NetworkingV1().Ingresses("default").Get(ctx, "site", metav1.GetOptions{})
		if err != nil {
			return nil
		}
		var ips []string
		for _, lb := range got.Status.LoadBalancer.Ingress {
			ips = append(ips, lb.IP)
		}
		return ips
	}
	eventually(t, "status of the Ready nodes", func() bool {
		return slices.Equal(status(), []string{"192.0.2.1", "203.0.113.2"})
	})
	n3 := fakeNode("n3", true, internal("192.0.2.3"))
	n3.ResourceVersion = "2"
	if _, err := fc.client.CoreV1().Nodes().Update(ctx, n3, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "n3 Ready joins status", func() bool {
		return slices.Equal(status(), []string{"192.0.2.1", "192.0.2.3", "203.0.113.2"})
	})
	cur, _ := fc.client.NetworkingV1().Ingresses("default").Get(ctx, "site", metav1.GetOptions{})
	cur.Spec.IngressClassName = ptr("nginx")
	cur.ResourceVersion = "5"
	if _, err := fc.client.NetworkingV1().Ingresses("default").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "status cleared after leaving the class", func() bool { return len(status()) == 0 })
}

// TestRunListensOnConfiguredAddresses checks Run binds what it is told and
// fails cleanly on a taken port.
func TestRunListensOnConfiguredAddresses(t *testing.T) {
	fc := startFakeCluster(t, Config{})
	if fc.c.HTTPAddr() == nil || fc.c.HTTPSAddr() == nil {
		t.Fatal("listeners not bound")
	}
	if code, _ := fc.get("any.com", "/"); code != 404 {
		t.Errorf("empty table: %d", code)
	}
	// Same port again: Run returns an error instead of serving nothing.
	_, src := fakeSources(fake.NewClientset())
	c2, err := New(Config{HTTPAddr: fc.c.HTTPAddr().String()}, src, prometheus.NewRegistry(), testLogger())
	if err != nil {
		t.Fatal(err)
	}
	if err := c2.Run(context.Background()); err == nil {
		t.Error("Run on a taken port returned nil")
	}
	if c2.Name() != "ingress" {
		t.Error(c2.Name())
	}
}

func TestConfigValidation(t *testing.T) {
	bad := []Config{
		{DefaultBackend: "no-port"},
		{DefaultBackend: "ns/name:0"},
		{StatusFromService: "nonamespace"},
		{HTTPAddr: "not an address"},
		{HTTPAddr: ":80", HTTPSAddr: ":80"},
	}
	for _, c := range bad {
		c.setDefaults()
		if err := c.validate(); err == nil {
			t.Errorf("%+v: accepted", c)
		}
	}
	d := DefaultConfig()
	if d.HTTPAddr != ":80" || d.HTTPSAddr != ":443" || d.ControllerName != "knit.dev/ingress" || d.validate() != nil {
		t.Errorf("DefaultConfig %+v", d)
	}
	if _, err := New(Config{}, Sources{}, prometheus.NewRegistry(), testLogger()); err == nil {
		t.Error("New without informers succeeded")
	}
}
