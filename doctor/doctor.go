package doctor

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"knit.dev/knit/status"
)

// Outcome of one check.
type Outcome string

// Outcomes.
const (
	OK   Outcome = "ok"
	Fail Outcome = "fail"
	Warn Outcome = "warn" // worth knowing, not what breaks the Service
	Skip Outcome = "skip" // could not be checked from here, or does not apply
)

// Result is one check's finding.
type Result struct {
	Check   string   `json:"check"`
	Outcome Outcome  `json:"outcome"`
	Summary string   `json:"summary"`
	Details []string `json:"details,omitempty"`
	Fix     string   `json:"fix,omitempty"`
}

// Report is the whole diagnosis.
type Report struct {
	Service string   `json:"service"`
	From    []string `json:"from"`
	Results []Result `json:"results"`
	// Verdict is the first failed check; nil when every check passed.
	Verdict *Result `json:"verdict,omitempty"`
}

// Target is what to diagnose.
type Target struct {
	Namespace, Name string
	// FromNode or FromPod ("namespace/name") pick where probes start;
	// neither: every node with an endpoint and one without.
	FromNode string
	FromPod  string
}

// Check names, in the order they run.
const (
	CheckDNS       = "dns"
	CheckService   = "service"
	CheckEndpoints = "endpoints"
	CheckAgents    = "agents"
	CheckRules     = "rules"
	CheckProbes    = "probes"
	CheckOverlay   = "overlay"
)

// check is one step of the checklist.
type check struct {
	name string
	run  func(*run) Result
}

var checklist = []check{
	{CheckDNS, (*run).checkDNS},
	{CheckService, (*run).checkService},
	{CheckEndpoints, (*run).checkEndpoints},
	{CheckAgents, (*run).checkAgents},
	{CheckRules, (*run).checkRules},
	{CheckProbes, (*run).checkProbes},
	{CheckOverlay, (*run).checkOverlay},
}

// run holds what the checks read, gathered once up front.
type run struct {
	ctx context.Context
	env *Env
	t   Target

	svc    *corev1.Service
	slices []discoveryv1.EndpointSlice

	nodes   map[string]*NodeInfo
	from    []*NodeInfo
	fromPod *corev1.Pod
	// involved: from nodes and endpoint nodes, sorted by name.
	involved []*NodeInfo

	mu        sync.Mutex
	reports   map[string]*NodeReport
	reportErr map[string]error
	statuses  map[string]*status.Node
	statusErr map[string]error

	// notApplicable is set by a check after which the rest do not apply
	// (an ExternalName Service has no endpoints or rules).
	notApplicable string
	// syncRetry is how long to wait before asking an agent again when its
	// cache disagrees with the API (tests set 0).
	syncRetry time.Duration
}

// Run diagnoses a Service: it gathers what the API server and the agents
// know, then runs the checks in order and stops at the first that fails.
func Run(ctx context.Context, env *Env, t Target) (*Report, error) {
	r, err := gather(ctx, env, t, 2*time.Second)
	if err != nil {
		return nil, err
	}
	return runChecks(r), nil
}

// runChecks runs the checklist over gathered facts.
func runChecks(r *run) *Report {
	rep := &Report{Service: r.name()}
	for _, n := range r.from {
		rep.From = append(rep.From, n.Name)
	}
	for _, c := range checklist {
		var res Result
		if r.notApplicable != "" {
			res = Result{Outcome: Skip, Summary: r.notApplicable}
		} else if rep.Verdict != nil {
			res = Result{Outcome: Skip, Summary: "not checked: an earlier check failed"}
		} else {
			res = c.run(r)
		}
		res.Check = c.name
		rep.Results = append(rep.Results, res)
		if res.Outcome == Fail && rep.Verdict == nil {
			v := res
			rep.Verdict = &v
		}
	}
	return rep
}

// gather reads the Service, its slices, the nodes and their agents.
func gather(ctx context.Context, env *Env, t Target, syncRetry time.Duration) (*run, error) {
	r := &run{ctx: ctx, env: env, t: t, syncRetry: syncRetry,
		reports: map[string]*NodeReport{}, reportErr: map[string]error{},
		statuses: map[string]*status.Node{}, statusErr: map[string]error{}}
	svc, err := getService(ctx, env, t.Namespace, t.Name)
	if err != nil {
		return nil, fmt.Errorf("get Service %s/%s: %w", t.Namespace, t.Name, err)
	}
	r.svc = svc
	sl, err := env.Client.DiscoveryV1().EndpointSlices(t.Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=" + t.Name})
	if err != nil {
		return nil, fmt.Errorf("list EndpointSlices: %w", err)
	}
	r.slices = sl.Items
	nodes, err := env.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	r.nodes = map[string]*NodeInfo{}
	for _, n := range nodes {
		r.nodes[n.Name] = n
	}
	if err := r.pickFrom(nodes); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, n := range r.from {
		seen[n.Name] = true
		r.involved = append(r.involved, n)
	}
	for _, e := range r.readyEndpoints() {
		if n := r.nodes[e.Node]; n != nil && !seen[n.Name] {
			seen[n.Name] = true
			r.involved = append(r.involved, n)
		}
	}
	sort.Slice(r.involved, func(i, j int) bool { return r.involved[i].Name < r.involved[j].Name })
	r.fetch()
	return r, nil
}

// pickFrom chooses the nodes probes start from.
func (r *run) pickFrom(nodes []*NodeInfo) error {
	switch {
	case r.t.FromPod != "":
		ns, name, ok := strings.Cut(r.t.FromPod, "/")
		if !ok {
			ns, name = r.t.Namespace, r.t.FromPod
		}
		p, err := getPod(r.ctx, r.env, ns, name)
		if err == nil && p == nil {
			err = errors.New("no such pod")
		}
		if err != nil {
			return fmt.Errorf("--from pod %s/%s: %w", ns, name, err)
		}
		n := r.nodes[p.Spec.NodeName]
		if n == nil {
			return fmt.Errorf("--from pod %s/%s: it runs on no known node (%q)", ns, name, p.Spec.NodeName)
		}
		r.fromPod, r.from = p, []*NodeInfo{n}
	case r.t.FromNode != "":
		n := r.nodes[r.t.FromNode]
		if n == nil {
			return fmt.Errorf("--from node %s: no such Node", r.t.FromNode)
		}
		r.from = []*NodeInfo{n}
	default:
		hosts := map[string]bool{}
		for _, e := range r.readyEndpoints() {
			if n := r.nodes[e.Node]; n != nil && !hosts[n.Name] {
				hosts[n.Name] = true
				r.from = append(r.from, n)
			}
		}
		// One node without an endpoint, preferring one whose agent the
		// CLI can reach, so that the cross-node path is tried too.
		var other *NodeInfo
		for _, n := range nodes {
			if !hosts[n.Name] && (other == nil || other.URL == "" && n.URL != "") {
				other = n
			}
		}
		if other != nil {
			r.from = append(r.from, other)
		}
		sort.Slice(r.from, func(i, j int) bool { return r.from[i].Name < r.from[j].Name })
	}
	return nil
}

// fetch asks every involved node's agent for its status, and for a
// report on the Service (with probes from the from nodes), in parallel.
func (r *run) fetch() {
	var wg sync.WaitGroup
	for _, n := range r.involved {
		probe := slices.Contains(r.from, n)
		wg.Add(2)
		go func() {
			defer wg.Done()
			st, err := r.env.Agents.Status(r.ctx, n)
			r.mu.Lock()
			r.statuses[n.Name], r.statusErr[n.Name] = st, err
			r.mu.Unlock()
		}()
		go func() {
			defer wg.Done()
			rep, err := r.env.Agents.Inspect(r.ctx, n, r.t.Namespace, r.t.Name, probe)
			r.mu.Lock()
			r.reports[n.Name], r.reportErr[n.Name] = rep, err
			r.mu.Unlock()
		}()
	}
	wg.Wait()
	for name, err := range r.reportErr {
		if err != nil {
			r.reports[name] = nil
		}
	}
	for name, err := range r.statusErr {
		if err != nil {
			r.statuses[name] = nil
		}
	}
}

// apiEndpoint is an endpoint as the API server lists it.
type apiEndpoint struct {
	IP, Node, Pod string
	Ready         bool
	Port          int // target port of the asked-for port name
}

// endpoints lists the Service's endpoints for one port name ("" and a
// Service with one unnamed port are the same); anyPort: every port.
func (r *run) endpoints(portName string, anyPort bool) []apiEndpoint {
	var out []apiEndpoint
	seen := map[string]bool{}
	for _, s := range r.slices {
		port, has := 0, anyPort
		for _, p := range s.Ports {
			n := ""
			if p.Name != nil {
				n = *p.Name
			}
			if n == portName && p.Port != nil {
				port, has = int(*p.Port), true
			}
		}
		if !has {
			continue
		}
		for _, e := range s.Endpoints {
			for _, a := range e.Addresses {
				key := a + fmt.Sprint(port)
				if seen[key] {
					continue
				}
				seen[key] = true
				ae := apiEndpoint{IP: a, Port: port, Ready: e.Conditions.Ready == nil || *e.Conditions.Ready}
				if e.NodeName != nil {
					ae.Node = *e.NodeName
				}
				if e.TargetRef != nil {
					ae.Pod = e.TargetRef.Name
				}
				out = append(out, ae)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].IP < out[j].IP })
	return out
}

// readyEndpoints are the ready endpoints of any port, one per address.
func (r *run) readyEndpoints() []apiEndpoint {
	var out []apiEndpoint
	seen := map[string]bool{}
	for _, e := range r.endpoints("", true) {
		if e.Ready && !seen[e.IP] {
			seen[e.IP] = true
			out = append(out, e)
		}
	}
	return out
}

func (r *run) fromNames() string {
	var names []string
	for _, n := range r.from {
		names = append(names, n.Name)
	}
	return strings.Join(names, ", ")
}

// agentFix is the fix for a node whose agent is down or wrong.
func (r *run) agentFix(node string) string {
	return fmt.Sprintf("look at knit's pod on %s: kubectl -n %s get pods -o wide --field-selector spec.nodeName=%s, and its log (kubectl -n %s logs <pod>); "+
		"the rules already in the kernel keep working while the agent is down, but %s follows no change until it runs again",
		node, r.env.StatusNamespace, node, r.env.StatusNamespace, node)
}

var errNoReport = errors.New("no report")

// report returns a node's report or why there is none.
func (r *run) report(n *NodeInfo) (*NodeReport, error) {
	if rep := r.reports[n.Name]; rep != nil {
		return rep, nil
	}
	if err := r.reportErr[n.Name]; err != nil {
		return nil, err
	}
	return nil, errNoReport
}

// getService and getPod read one object with a list by name: knit's own
// ServiceAccount (`knit doctor` run inside knit's pod on a node) may list
// and watch Services and Pods, not get them. Nil, nil: not found.
func getService(ctx context.Context, env *Env, ns, name string) (*corev1.Service, error) {
	l, err := env.Client.CoreV1().Services(ns).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String()})
	if err != nil {
		return nil, err
	}
	for i := range l.Items {
		if l.Items[i].Name == name {
			return &l.Items[i], nil
		}
	}
	return nil, nil
}

func getPod(ctx context.Context, env *Env, ns, name string) (*corev1.Pod, error) {
	l, err := env.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String()})
	if err != nil {
		return nil, err
	}
	for i := range l.Items {
		if l.Items[i].Name == name {
			return &l.Items[i], nil
		}
	}
	return nil, nil
}
