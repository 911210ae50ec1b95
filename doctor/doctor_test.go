package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"knit.dev/knit/status"
)

// fakeAgents answers from canned documents; a node missing from a map
// does not answer.
type fakeAgents struct {
	statuses map[string]*status.Node
	reports  map[string]*NodeReport
}

func (f *fakeAgents) Status(_ context.Context, n *NodeInfo) (*status.Node, error) {
	if n.URL == "" {
		return nil, errors.New("unreachable: " + n.Unreachable)
	}
	if s := f.statuses[n.Name]; s != nil {
		return s, nil
	}
	return nil, errors.New("connection refused")
}

func (f *fakeAgents) Inspect(_ context.Context, n *NodeInfo, _, _ string, probe bool) (*NodeReport, error) {
	if n.URL == "" {
		return nil, errors.New("unreachable: " + n.Unreachable)
	}
	r := f.reports[n.Name]
	if r == nil {
		return nil, errors.New("connection refused")
	}
	// A copy, as if decoded from JSON: checks must not share state.
	b, _ := json.Marshal(r)
	var out NodeReport
	_ = json.Unmarshal(b, &out)
	if !probe {
		out.Probes, out.MTU = nil, nil
	}
	return &out, nil
}

// world is a small cluster: three nodes, Service ns/web (ClusterIP
// 10.43.0.20, port http 80 -> targetPort "http") with one ready pod on
// node2 (10.42.1.5:8080); everything healthy.
type world struct {
	nodes   []*corev1.Node
	leases  map[string]*status.Summary
	svc     *corev1.Service
	pods    []*corev1.Pod
	slice   *discoveryv1.EndpointSlice
	events  []*corev1.Event
	agents  *fakeAgents
	now     time.Time
	renewed time.Time
}

var now = time.Date(2026, 12, 4, 21, 0, 0, 0, time.UTC)

func ptr[T any](v T) *T { return &v }

func healthyWorld() *world {
	w := &world{now: now, renewed: now.Add(-20 * time.Second), leases: map[string]*status.Summary{},
		agents: &fakeAgents{statuses: map[string]*status.Node{}, reports: map[string]*NodeReport{}}}
	for i, name := range []string{"node1", "node2", "node3"} {
		ip := "198.18.0." + string(rune('1'+i))
		cidr := "10.42." + string(rune('0'+i)) + ".0/24"
		w.nodes = append(w.nodes, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
			Status: corev1.NodeStatus{
				Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}},
				Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
			},
		})
		doc := &status.Node{Node: name, Time: now, HealthAddr: ip + ":9940",
			Components: []status.Component{{Name: "overlay", Ready: true}, {Name: "proxy", Ready: true}, {Name: "dns", Ready: true}},
			Overlay:    &status.Overlay{Backend: "vxlan", PodMTU: 1450, UnderlayMTU: 1500, Overhead: 50},
			Proxy:      &status.Proxy{Backend: "nftables", Table: "knit-proxy"},
			DNS:        &status.DNS{},
		}
		w.agents.statuses[name] = doc
		sum := status.Summarize(doc, status.StateRunning)
		w.leases[name] = &sum
		w.agents.reports[name] = &NodeReport{
			Node:  name,
			Cache: CacheView{Found: true, Synced: true, ClusterIPs: []string{"10.43.0.20"}, Endpoints: []Endpoint{{IP: "10.42.1.5", Node: "node2", Pod: "web-0", Ready: true, Ports: map[string]int{"http": 8080}}}},
			DNS:   &DNSResult{Name: "web.ns.svc.cluster.local.", Server: "10.43.0.10:53", Rcode: "NOERROR", Answers: []string{"10.43.0.20"}},
			Ports: []PortRules{{Port: "http", Protocol: "tcp", Number: 80, ClusterIP: "10.43.0.20", Map: "service-ips-v4",
				Verdict: "goto service-v4-ns/web/tcp/http", Chain: "service-v4-ns/web/tcp/http", ChainFound: true, Endpoints: []string{"10.42.1.5:8080"}}},
			Probes: []Probe{
				{Kind: "clusterIP", Target: "10.43.0.20:80", Port: "http", OK: true, Protocol: "tcp"},
				{Kind: "endpoint", Target: "10.42.1.5:8080", Port: "http", Pod: "web-0", Node: "node2", OK: true, Protocol: "tcp"},
			},
			Routes: []RouteCheck{{IP: "10.42.1.5", Node: "node2", Local: name == "node2", Knit: name != "node2", Dst: "10.42.1.0/24",
				Dev: "knit-vx4", Gateway: "10.42.1.0", Neigh: ptr(true), FDB: ptr(true)}},
			Links: []Link{{Name: "knit-vx4", Role: RoleVXLAN, MTU: 1450}, {Name: "eth0", Role: RoleUnderlay, MTU: 1500}, {Name: "cni0", Role: RoleBridge, MTU: 1450}},
		}
		if name != "node2" {
			w.agents.reports[name].MTU = []MTUProbe{{Target: "10.42.1.5", Node: "node2", Size: 1450, SmallOK: true, BigOK: true}}
		}
	}
	w.svc = &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.43.0.20", ClusterIPs: []string{"10.43.0.20"},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Selector:   map[string]string{"app": "web"},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromString("http")}}},
	}
	w.pods = []*corev1.Pod{{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Namespace: "ns", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{NodeName: "node2", Containers: []corev1.Container{{Name: "echo",
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.42.1.5",
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}}
	w.slice = &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Namespace: "ns", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.42.1.5"}, NodeName: ptr("node2"),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: "web-0", Namespace: "ns"}}},
	}
	return w
}

func (w *world) env() *Env {
	var objs []runtime.Object
	for _, n := range w.nodes {
		objs = append(objs, n)
	}
	for name, s := range w.leases {
		raw, _ := json.Marshal(s)
		objs = append(objs, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: status.LeaseName(name), Namespace: status.DefaultNamespace,
				Labels: map[string]string{status.LeaseLabel: "true"}, Annotations: map[string]string{status.SummaryAnnotation: string(raw)}},
			Spec: coordinationv1.LeaseSpec{RenewTime: &metav1.MicroTime{Time: w.renewed}, LeaseDurationSeconds: ptr(int32(180))},
		})
	}
	if w.svc != nil {
		objs = append(objs, w.svc)
	}
	for _, p := range w.pods {
		objs = append(objs, p)
	}
	if w.slice != nil {
		objs = append(objs, w.slice)
	}
	for _, e := range w.events {
		objs = append(objs, e)
	}
	return &Env{Client: fake.NewClientset(objs...), Agents: w.agents, StatusNamespace: status.DefaultNamespace,
		Now: func() time.Time { return w.now }}
}

func TestRun(t *testing.T) {
	tests := []struct {
		name    string
		from    string
		breakIt func(w *world)
		// check is the verdict's check ("" for none); want are substrings
		// of its summary, details and fix.
		check string
		want  []string
	}{
		{name: "healthy", breakIt: func(*world) {}},
		{name: "no such Service", check: CheckDNS, want: []string{"NXDOMAIN", "there is no Service ns/web"}, breakIt: func(w *world) {
			w.svc, w.slice = nil, nil
			for _, r := range w.agents.reports {
				r.Cache = CacheView{Synced: true}
				r.DNS.Rcode, r.DNS.Answers = "NXDOMAIN", nil
				r.Ports, r.Probes, r.Routes, r.MTU = nil, nil, nil, nil
			}
		}},
		{name: "scaled to zero", check: CheckEndpoints, want: []string{"no running pod matches the selector app=web", "scale"}, breakIt: func(w *world) {
			w.pods = nil
			w.slice.Endpoints = nil
			noEndpoints(w)
		}},
		{name: "similar labels named", check: CheckEndpoints, want: []string{"1 pod(s) have app=webb"}, breakIt: func(w *world) {
			w.pods[0].Labels["app"] = "webb"
			w.slice.Endpoints = nil
			noEndpoints(w)
		}},
		{name: "failing readiness", check: CheckEndpoints, want: []string{"none is Ready", "pod web-0 on node2", "ContainersNotReady", "Readiness probe failed: HTTP probe failed with statuscode: 503"}, breakIt: func(w *world) {
			w.pods[0].Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse, Reason: "ContainersNotReady", Message: "containers with unready status: [echo]"}}
			w.slice.Endpoints[0].Conditions.Ready = ptr(false)
			w.events = []*corev1.Event{{ObjectMeta: metav1.ObjectMeta{Name: "web-0.1", Namespace: "ns"},
				InvolvedObject: corev1.ObjectReference{Kind: "Pod", Name: "web-0", Namespace: "ns"}, Reason: "Unhealthy",
				Message: "Readiness probe failed: HTTP probe failed with statuscode: 503", LastTimestamp: metav1.NewTime(now)}}
			noEndpoints(w)
		}},
		{name: "targetPort names nothing", check: CheckEndpoints, want: []string{`targetPort "htttp" names no TCP port`, "http 8080/TCP"}, breakIt: func(w *world) {
			w.svc.Spec.Ports[0].TargetPort = intstr.FromString("htttp")
			w.slice.Ports = nil
			noEndpoints(w)
		}},
		{name: "agent stopped on the endpoint's node", check: CheckAgents, want: []string{"knit's agent on node2 is not running", "stopped"}, breakIt: func(w *world) {
			w.leases["node2"].State = status.StateStopped
			delete(w.agents.statuses, "node2")
			delete(w.agents.reports, "node2")
		}},
		{name: "agent gone without a word", check: CheckAgents, want: []string{"node2 does not answer"}, breakIt: func(w *world) {
			delete(w.agents.statuses, "node2")
			delete(w.agents.reports, "node2")
		}},
		{name: "agent silent too long", check: CheckAgents, want: []string{"not heard from since", "Lease expired"}, breakIt: func(w *world) {
			w.renewed = now.Add(-10 * time.Minute)
		}},
		{name: "proxy sync failing", check: CheckAgents, want: []string{"knit on node1 is not healthy", "proxy: last sync failed", "nft: boom"}, breakIt: func(w *world) {
			w.agents.statuses["node1"].Proxy.LastError = "nft: boom"
		}},
		{name: "cache behind", check: CheckAgents, want: []string{"node1 is not synced", "ready endpoints are []"}, breakIt: func(w *world) {
			w.agents.reports["node1"].Cache.Endpoints = nil
		}},
		{name: "rule missing", check: CheckRules, want: []string{"node1 has no rule for 10.43.0.20:80/tcp", "restart knit's agent on node1"}, breakIt: func(w *world) {
			w.agents.reports["node1"].Ports[0].Map, w.agents.reports["node1"].Ports[0].Verdict = "", ""
			w.agents.reports["node1"].Ports[0].ChainFound, w.agents.reports["node1"].Ports[0].Endpoints = false, nil
		}},
		{name: "endpoint missing from rules", check: CheckRules, want: []string{"lack ready endpoint(s) 10.42.1.5:8080"}, breakIt: func(w *world) {
			w.agents.reports["node1"].Ports[0].Endpoints = nil
		}},
		{name: "wrong numeric targetPort", check: CheckProbes, want: []string{"nothing listens on 10.42.1.5:8081", "targetPort 8081", "declares 8080 (http)"}, breakIt: func(w *world) {
			w.svc.Spec.Ports[0].TargetPort = intstr.FromInt32(8081)
			w.slice.Ports[0].Port = ptr(int32(8081))
			for _, r := range w.agents.reports {
				r.Cache.Endpoints[0].Ports["http"] = 8081
				r.Ports[0].Endpoints = []string{"10.42.1.5:8081"}
				for i := range r.Probes {
					r.Probes[i].OK, r.Probes[i].Refused, r.Probes[i].Error = false, true, "connect: connection refused"
					if r.Probes[i].Kind == "endpoint" {
						r.Probes[i].Target = "10.42.1.5:8081"
					}
				}
			}
		}},
		{name: "route deleted", from: "node1", check: CheckProbes, want: []string{"node1 has no knit route to node2's pod network 10.42.1.0/24", "via 198.18.0.254 dev eth0"}, breakIt: func(w *world) {
			r := w.agents.reports["node1"]
			r.Routes[0] = RouteCheck{IP: "10.42.1.5", Node: "node2", Actual: "via 198.18.0.254 dev eth0"}
			for i := range r.Probes {
				r.Probes[i].OK, r.Probes[i].Timeout, r.Probes[i].Error = false, true, "i/o timeout"
			}
		}},
		{name: "native nftables forward drop on the endpoint's node", from: "node1", check: CheckProbes,
			want: []string{"node1 gets no answer from 10.42.1.5:8080", "node2 has an nftables forward chain with policy drop (inet filter forward)", "ip saddr <cluster CIDR> accept"},
			breakIt: func(w *world) {
				w.agents.statuses["node2"].Overlay.ForwardBlocked = []string{"inet filter forward"}
				r := w.agents.reports["node1"]
				for i := range r.Probes {
					r.Probes[i].OK, r.Probes[i].Timeout, r.Probes[i].Error = false, true, "i/o timeout"
				}
			}},
		{name: "route shadowed by a more specific one", from: "node1", check: CheckOverlay, want: []string{"has knit's route 10.42.1.0/24 dev knit-vx4, but sends 10.42.1.5 via 198.18.0.254 dev eth0", "ip route get 10.42.1.5"}, breakIt: func(w *world) {
			w.agents.reports["node1"].Routes[0].Shadowed = true
			w.agents.reports["node1"].Routes[0].Actual = "via 198.18.0.254 dev eth0"
		}},
		{name: "overlay not running on the client node", from: "node1", check: CheckProbes, want: []string{"no knit route to node2's pod network", "knit's overlay does not run on node1"}, breakIt: func(w *world) {
			w.agents.statuses["node1"].Overlay = nil
			r := w.agents.reports["node1"]
			r.Routes[0] = RouteCheck{IP: "10.42.1.5", Node: "node2", Actual: "via 198.18.0.254 dev eth0"}
			for i := range r.Probes {
				r.Probes[i].OK, r.Probes[i].Timeout, r.Probes[i].Error = false, true, "i/o timeout"
			}
		}},
		{name: "FDB entry missing", from: "node1", check: CheckOverlay, want: []string{"no FDB entry on knit-vx4 for node2's VTEP"}, breakIt: func(w *world) {
			w.agents.reports["node1"].Routes[0].FDB = ptr(false)
		}},
		{name: "peer skipped", from: "node1", check: CheckOverlay, want: []string{"overlay on node1 skips node2: missing-annotation"}, breakIt: func(w *world) {
			w.agents.statuses["node1"].Overlay.Peers = []status.Peer{{Node: "node2", Skipped: "missing-annotation"}}
		}},
		{name: "wrong MTU", from: "node1", check: CheckOverlay, want: []string{"1450-byte packets from node1 to 10.42.1.5 on node2 are lost", "node2's underlay interface eth0 has MTU 1400"}, breakIt: func(w *world) {
			w.agents.reports["node1"].MTU[0].BigOK = false
			w.agents.reports["node2"].Links[1].MTU = 1400
		}},
		{name: "MTU mismatch without a probe", from: "node1", check: CheckOverlay, want: []string{"node2's underlay interface eth0 has MTU 1400", "1500 once VXLAN-encapsulated"}, breakIt: func(w *world) {
			w.agents.reports["node1"].MTU = nil
			w.agents.reports["node2"].Links[1].MTU = 1400
		}},
		{name: "agents behind loopback: judged from Leases, node checks skipped", breakIt: func(w *world) {
			for _, s := range w.leases {
				s.HealthAddr = "127.0.0.1:9940"
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := healthyWorld()
			tt.breakIt(w)
			r, err := gather(context.Background(), w.env(), Target{Namespace: "ns", Name: "web", FromNode: tt.from}, 0)
			if err != nil {
				t.Fatal(err)
			}
			rep := runChecks(r)
			if tt.check == "" {
				if rep.Verdict != nil {
					t.Fatalf("verdict %+v, want none", rep.Verdict)
				}
				return
			}
			if rep.Verdict == nil {
				t.Fatalf("no verdict, want %s; results %+v", tt.check, rep.Results)
			}
			if rep.Verdict.Check != tt.check {
				t.Fatalf("verdict at %s (%s), want %s", rep.Verdict.Check, rep.Verdict.Summary, tt.check)
			}
			text := rep.Verdict.Summary + "\n" + strings.Join(rep.Verdict.Details, "\n") + "\n" + rep.Verdict.Fix
			for _, w := range tt.want {
				if !strings.Contains(text, w) {
					t.Errorf("verdict lacks %q:\n%s", w, text)
				}
			}
			// Every check after the verdict is skipped.
			after := false
			for _, res := range rep.Results {
				if after && res.Outcome != Skip {
					t.Errorf("check %s ran after the verdict: %+v", res.Check, res)
				}
				after = after || res.Check == tt.check
			}
		})
	}
}

// noEndpoints makes every agent agree that the Service has no endpoint.
func noEndpoints(w *world) {
	for _, r := range w.agents.reports {
		r.Cache.Endpoints = nil
		r.Ports[0].Map, r.Ports[0].Verdict, r.Ports[0].Endpoints = "no-endpoint-services-v4", "goto reject-chain", nil
		r.Probes, r.Routes, r.MTU = r.Probes[:1], nil, nil
		r.Probes[0].OK, r.Probes[0].Refused = false, true
	}
}

func TestLoopbackAgentsAreSkippedNotFailed(t *testing.T) {
	w := healthyWorld()
	for _, s := range w.leases {
		s.HealthAddr = "127.0.0.1:9940"
	}
	r, err := gather(context.Background(), w.env(), Target{Namespace: "ns", Name: "web"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	rep := runChecks(r)
	got := map[string]Outcome{}
	for _, res := range rep.Results {
		got[res.Check] = res.Outcome
	}
	want := map[string]Outcome{CheckDNS: Skip, CheckService: OK, CheckEndpoints: OK, CheckAgents: OK, CheckRules: Skip, CheckProbes: Skip}
	for c, o := range want {
		if got[c] != o {
			t.Errorf("%s: %s, want %s", c, got[c], o)
		}
	}
	if n := r.nodes["node1"]; !strings.Contains(n.Unreachable, "kubectl -n knit-system exec") {
		t.Errorf("unreachable note %q does not say how to run it on the node", n.Unreachable)
	}
}
