package doctor

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func (r *run) name() string { return r.t.Namespace + "/" + r.t.Name }

func (r *run) headless() bool {
	return r.svc != nil && r.svc.Spec.ClusterIP == corev1.ClusterIPNone
}

func (r *run) externalName() bool {
	return r.svc != nil && r.svc.Spec.Type == corev1.ServiceTypeExternalName
}

// 1. Does the name resolve, and through which server?
func (r *run) checkDNS() Result {
	var ok, details []string
	for _, n := range r.from {
		rep, err := r.report(n)
		if err != nil {
			details = append(details, fmt.Sprintf("%s: not asked (%v); see the agents check", n.Name, err))
			continue
		}
		d := rep.DNS
		if d == nil {
			details = append(details, n.Name+": its agent runs no cluster DNS")
			continue
		}
		via := fmt.Sprintf("%s from %s", d.Server, n.Name)
		if r.fromPod != nil {
			via += r.podDNSNote()
		}
		switch {
		case d.Error != "":
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s does not resolve: no answer from the cluster DNS %s: %s", d.Name, via, d.Error),
				Fix:     "knit's agent on " + n.Name + " is the cluster DNS there: check it with `knit status`; " + r.agentFix(n.Name)}
		case d.Rcode == "NXDOMAIN" && r.svc == nil:
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s does not resolve (NXDOMAIN from %s): there is no Service %s", d.Name, via, r.name()),
				Details: r.sameNameElsewhere(),
				Fix:     "check the name and the namespace; the Service must exist in the namespace the client asks for"}
		case d.Rcode == "NXDOMAIN" && r.headless() && len(r.readyEndpoints()) == 0:
			res := r.checkEndpoints()
			res.Summary = fmt.Sprintf("%s does not resolve (NXDOMAIN from %s): the Service is headless and has no ready endpoint; %s", d.Name, via, res.Summary)
			res.Outcome = Fail
			return res
		case d.Rcode == "NXDOMAIN":
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s does not resolve (NXDOMAIN from %s), but the Service exists: knit's DNS on %s has not seen it", d.Name, via, n.Name),
				Fix:     "knit's cache on " + n.Name + " is behind the API server (see the agents check); " + r.agentFix(n.Name)}
		case d.Rcode == "SERVFAIL":
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s: SERVFAIL from %s: knit's DNS there has not synced with the API server", d.Name, via),
				Fix:     r.agentFix(n.Name)}
		case d.Rcode != "NOERROR":
			return Result{Outcome: Fail, Summary: fmt.Sprintf("%s: %s from %s", d.Name, d.Rcode, via)}
		}
		want := r.wantAnswers()
		got := slices.Clone(d.Answers)
		sort.Strings(got)
		mismatch := want != nil && !slices.Equal(got, want)
		if r.externalName() {
			// The answer also holds what the CNAME's target resolved to.
			mismatch = !slices.Contains(got, want[0])
		}
		if mismatch {
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s resolves to %s from %s, but the API says %s", d.Name, orNone(got), via, orNone(want)),
				Fix:     "knit's DNS on " + n.Name + " answers from a stale cache (see the agents check); " + r.agentFix(n.Name)}
		}
		ok = append(ok, fmt.Sprintf("%s -> %s through %s (%.1f ms)", d.Name, strings.Join(d.Answers, ", "), via, d.Millis))
	}
	if len(ok) == 0 {
		return Result{Outcome: Skip, Summary: "could not ask any node's cluster DNS", Details: details}
	}
	return Result{Outcome: OK, Summary: ok[0], Details: append(ok[1:], details...)}
}

// podDNSNote says which resolver the pod itself would use.
func (r *run) podDNSNote() string {
	p := r.fromPod
	switch p.Spec.DNSPolicy {
	case corev1.DNSDefault:
		return fmt.Sprintf(" (pod %s has dnsPolicy Default: it asks the node's resolvers, not the cluster DNS)", p.Name)
	case corev1.DNSNone:
		if p.Spec.DNSConfig != nil {
			return fmt.Sprintf(" (pod %s has dnsPolicy None: it asks %v)", p.Name, p.Spec.DNSConfig.Nameservers)
		}
	}
	return fmt.Sprintf(" (pod %s's node)", p.Name)
}

// wantAnswers is what the name should resolve to, sorted; nil: anything.
func (r *run) wantAnswers() []string {
	if r.svc == nil {
		return nil
	}
	if r.externalName() {
		return []string{"CNAME " + strings.TrimSuffix(r.svc.Spec.ExternalName, ".") + "."}
	}
	var want []string
	if r.headless() {
		for _, e := range r.readyEndpoints() {
			want = append(want, e.IP)
		}
	} else {
		for _, ip := range clusterIPs(r.svc) {
			if a, err := netip.ParseAddr(ip); err == nil && len(r.svc.Spec.IPFamilies) > 0 &&
				(a.Is6() == (r.svc.Spec.IPFamilies[0] == corev1.IPv6Protocol)) {
				want = append(want, ip)
			}
		}
		if len(want) == 0 {
			want = clusterIPs(r.svc)[:1]
		}
	}
	sort.Strings(want)
	return want
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "nothing"
	}
	return strings.Join(s, ", ")
}

// sameNameElsewhere lists namespaces that hold a Service of that name.
func (r *run) sameNameElsewhere() []string {
	l, err := r.env.Client.CoreV1().Services("").List(r.ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("metadata.name", r.t.Name).String()})
	if err != nil || len(l.Items) == 0 {
		return nil
	}
	var ns []string
	for _, s := range l.Items {
		ns = append(ns, s.Namespace)
	}
	return []string{fmt.Sprintf("a Service named %s exists in namespace(s): %s", r.t.Name, strings.Join(ns, ", "))}
}

// 2. Does the Service exist, and has it a ClusterIP?
func (r *run) checkService() Result {
	if r.svc == nil {
		return Result{Outcome: Fail, Summary: "there is no Service " + r.name(), Details: r.sameNameElsewhere(),
			Fix: "check the name and the namespace (kubectl get svc -A)"}
	}
	s := r.svc
	var ports []string
	for _, p := range s.Spec.Ports {
		ports = append(ports, fmt.Sprintf("%s %d/%s -> %s", orUnnamed(p.Name), p.Port, p.Protocol, p.TargetPort.String()))
	}
	switch {
	case r.externalName():
		r.notApplicable = "does not apply: an ExternalName Service is only a DNS CNAME"
		return Result{Outcome: OK, Summary: fmt.Sprintf("ExternalName Service: DNS answers a CNAME to %s; knit programs no rules for it", s.Spec.ExternalName)}
	case r.headless():
		return Result{Outcome: OK, Summary: "headless Service (no ClusterIP): DNS answers the ready endpoints' addresses; no proxy rules", Details: ports}
	case s.Spec.ClusterIP == "":
		return Result{Outcome: Fail, Summary: "the Service has no ClusterIP yet", Fix: "the API server allocates it on create; check the service CIDR is not exhausted"}
	}
	return Result{Outcome: OK, Summary: fmt.Sprintf("%s Service with ClusterIP %s", s.Spec.Type, strings.Join(clusterIPs(s), ", ")), Details: ports}
}

func orUnnamed(n string) string {
	if n == "" {
		return "(unnamed)"
	}
	return n
}

// 3. Do its EndpointSlices have ready endpoints, and if not, why?
func (r *run) checkEndpoints() Result {
	s := r.svc
	if s == nil {
		return Result{Outcome: Skip, Summary: "no Service"}
	}
	var details []string
	total := 0
	for _, sp := range s.Spec.Ports {
		eps := r.endpoints(sp.Name, false)
		var ready, notReady []string
		for _, e := range eps {
			if e.Ready {
				ready = append(ready, e.IP)
			} else {
				notReady = append(notReady, e.IP+" ("+e.Pod+")")
			}
		}
		total += len(ready)
		if len(ready) == 0 {
			return r.whyNoEndpoints(sp)
		}
		d := fmt.Sprintf("port %s: %d ready (%s)", orUnnamed(sp.Name), len(ready), strings.Join(ready, ", "))
		if len(notReady) > 0 {
			d += fmt.Sprintf("; not ready: %s", strings.Join(notReady, ", "))
		}
		details = append(details, d)
	}
	var nodes []string
	for _, e := range r.readyEndpoints() {
		if e.Node != "" && !slices.Contains(nodes, e.Node) {
			nodes = append(nodes, e.Node)
		}
	}
	sort.Strings(nodes)
	return Result{Outcome: OK, Summary: fmt.Sprintf("%d ready endpoint(s) on %s", len(r.readyEndpoints()), orNone(nodes)), Details: details}
}

// whyNoEndpoints explains a port without ready endpoints: no pod matches
// the selector, the pods are not Ready, or the targetPort names nothing.
func (r *run) whyNoEndpoints(sp corev1.ServicePort) Result {
	s := r.svc
	port := fmt.Sprintf("port %s (%d/%s)", orUnnamed(sp.Name), sp.Port, sp.Protocol)
	if len(s.Spec.Selector) == 0 {
		if len(r.slices) == 0 {
			return Result{Outcome: Fail, Summary: "the Service has no selector and no EndpointSlices: nothing to send traffic to",
				Fix: "add a selector, or create EndpointSlices labelled " + "kubernetes.io/service-name=" + s.Name}
		}
		return Result{Outcome: Fail, Summary: "the Service has no selector and its hand-made EndpointSlices list no ready endpoint for " + port,
			Fix: "fix the EndpointSlices (their endpoints' ready condition and port names must match the Service's ports)"}
	}
	sel := labels.SelectorFromSet(s.Spec.Selector)
	pods, err := r.env.Client.CoreV1().Pods(s.Namespace).List(r.ctx, metav1.ListOptions{LabelSelector: sel.String()})
	if err != nil {
		return Result{Outcome: Fail, Summary: port + " has no ready endpoint, and listing the pods failed: " + err.Error()}
	}
	var live []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			live = append(live, p)
		}
	}
	if len(live) == 0 {
		res := Result{Outcome: Fail,
			Summary: fmt.Sprintf("no ready endpoint: no running pod matches the selector %s in namespace %s", sel, s.Namespace),
			Fix:     "start the workload (e.g. kubectl scale --replicas=1 ...) or fix the Service's selector"}
		if len(pods.Items) > 0 {
			res.Details = append(res.Details, fmt.Sprintf("%d matching pod(s) are terminating or finished", len(pods.Items)))
		}
		res.Details = append(res.Details, r.similarPods(s.Spec.Selector)...)
		return res
	}
	var ready []corev1.Pod
	var details []string
	for _, p := range live {
		if podReady(&p) {
			ready = append(ready, p)
			continue
		}
		details = append(details, r.notReadyDetail(&p))
	}
	if len(ready) == 0 {
		return Result{Outcome: Fail,
			Summary: fmt.Sprintf("no ready endpoint: %d pod(s) match the selector %s but none is Ready", len(live), sel),
			Details: details,
			Fix:     "the pods' readiness checks fail: fix the application or its readinessProbe (kubectl describe pod " + live[0].Name + ")"}
	}
	if sp.TargetPort.Type == intstr.String {
		name := sp.TargetPort.StrVal
		var declared []string
		found := false
		for _, p := range ready {
			for _, c := range p.Spec.Containers {
				for _, cp := range c.Ports {
					declared = append(declared, fmt.Sprintf("%s %d/%s", orUnnamed(cp.Name), cp.ContainerPort, cp.Protocol))
					if cp.Name == name && protoOf(cp.Protocol) == protoOf(sp.Protocol) {
						found = true
					}
				}
			}
		}
		if !found {
			slices.Sort(declared)
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("no ready endpoint for %s: its targetPort %q names no %s port of the selected pods", port, name, protoOf(sp.Protocol)),
				Details: []string{"the pods declare: " + strings.Join(slices.Compact(declared), ", ")},
				Fix:     "set the Service port's targetPort to a port name (or number) the pods declare"}
		}
	}
	return Result{Outcome: Fail,
		Summary: fmt.Sprintf("%d pod(s) are Ready but the EndpointSlices list no ready endpoint for %s", len(ready), port),
		Fix:     "kube-controller-manager's EndpointSlice controller has not caught up or is not running: check it"}
}

func protoOf(p corev1.Protocol) corev1.Protocol {
	if p == "" {
		return corev1.ProtocolTCP
	}
	return p
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// notReadyDetail says why one pod is not Ready: its phase, Ready
// condition, and the latest readiness-probe Event.
func (r *run) notReadyDetail(p *corev1.Pod) string {
	d := fmt.Sprintf("pod %s on %s: %s", p.Name, orDash(p.Spec.NodeName), orDash(string(p.Status.Phase)))
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			d += fmt.Sprintf(", Ready=%s", c.Status)
			if c.Reason != "" {
				d += " " + c.Reason
			}
			if c.Message != "" {
				d += ": " + c.Message
			}
		}
	}
	evs, err := r.env.Client.CoreV1().Events(p.Namespace).List(r.ctx, metav1.ListOptions{
		FieldSelector: fields.AndSelectors(
			fields.OneTermEqualSelector("involvedObject.name", p.Name),
			fields.OneTermEqualSelector("reason", "Unhealthy")).String()})
	if err == nil && len(evs.Items) > 0 {
		last := evs.Items[0]
		for _, e := range evs.Items[1:] {
			if eventTime(&e).After(eventTime(&last)) {
				last = e
			}
		}
		d += "; last probe event: " + last.Message
	}
	return d
}

func eventTime(e *corev1.Event) time.Time {
	if !e.LastTimestamp.IsZero() {
		return e.LastTimestamp.Time
	}
	return e.EventTime.Time
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// similarPods names pods that share a selector key with other values: the
// usual typo or rename.
func (r *run) similarPods(selector map[string]string) []string {
	pods, err := r.env.Client.CoreV1().Pods(r.t.Namespace).List(r.ctx, metav1.ListOptions{})
	if err != nil {
		return nil
	}
	var out []string
	for k, v := range selector {
		vals := map[string]int{}
		for _, p := range pods.Items {
			if pv, ok := p.Labels[k]; ok && pv != v {
				vals[pv]++
			}
		}
		for pv, n := range vals {
			out = append(out, fmt.Sprintf("%d pod(s) have %s=%s", n, k, pv))
		}
	}
	sort.Strings(out)
	return out
}

// 4. Is knit running and synced on the nodes involved?
func (r *run) checkAgents() Result {
	var okNodes, details []string
	for _, n := range r.involved {
		if res, bad := r.agentProblem(n); bad {
			return res
		}
		okNodes = append(okNodes, n.Name)
		if n.URL == "" {
			details = append(details, n.Name+": judged from its status Lease only ("+n.Unreachable+")")
		}
	}
	for _, n := range r.from {
		if res, bad := r.cacheBehind(n); bad {
			return res
		}
	}
	return Result{Outcome: OK, Summary: "knit runs and is synced on " + strings.Join(okNodes, ", "), Details: details}
}

func (r *run) agentProblem(n *NodeInfo) (Result, bool) {
	fail := func(summary string, details ...string) (Result, bool) {
		return Result{Outcome: Fail, Summary: summary, Details: details, Fix: r.agentFix(n.Name)}, true
	}
	switch n.Agent {
	case "stopped":
		return fail(fmt.Sprintf("knit's agent on %s is not running: it stopped at %s and has not come back", n.Name, n.LastSeen.UTC().Format(time.RFC3339)))
	case "stale":
		return fail(fmt.Sprintf("knit's agent on %s is not running: not heard from since %s (its status Lease expired)", n.Name, n.LastSeen.UTC().Format(time.RFC3339)))
	}
	if n.URL != "" {
		st, err := r.statuses[n.Name], r.statusErr[n.Name]
		if st == nil {
			if err == nil {
				err = errNoReport
			}
			return fail(fmt.Sprintf("knit's agent on %s does not answer: %v", n.Name, err))
		}
		if probs := st.Unhealthy(); len(probs) > 0 {
			return fail(fmt.Sprintf("knit on %s is not healthy: %s", n.Name, probs[0]), probs[1:]...)
		}
		return Result{}, false
	}
	if n.Agent == "unknown" {
		return fail(fmt.Sprintf("knit's agent on %s has published no status, and the CLI cannot reach it (%s)", n.Name, n.Unreachable))
	}
	if s := n.Summary; s != nil {
		if len(s.NotReady) > 0 {
			return fail(fmt.Sprintf("knit on %s reports components not ready: %s", n.Name, strings.Join(s.NotReady, ", ")), s.Errors...)
		}
		if len(s.Errors) > 0 {
			return fail(fmt.Sprintf("knit on %s reports: %s", n.Name, s.Errors[0]), s.Errors[1:]...)
		}
	}
	return Result{}, false
}

// cacheBehind compares what a node's agent has cached for the Service
// with the API server, asking once more after a moment if they differ.
func (r *run) cacheBehind(n *NodeInfo) (Result, bool) {
	rep, err := r.report(n)
	if err != nil {
		return Result{}, false // already judged by agentProblem
	}
	diff := r.cacheDiff(rep)
	if diff != "" && r.syncRetry > 0 {
		time.Sleep(r.syncRetry)
		if again, err := r.env.Agents.Inspect(r.ctx, n, r.t.Namespace, r.t.Name, false); err == nil {
			rep.Cache = again.Cache
			diff = r.cacheDiff(rep)
		}
	}
	if diff == "" {
		return Result{}, false
	}
	return Result{Outcome: Fail, Summary: fmt.Sprintf("knit on %s is not synced with the API server: %s", n.Name, diff),
		Fix: "its watch of the API server is behind or broken; " + r.agentFix(n.Name)}, true
}

func (r *run) cacheDiff(rep *NodeReport) string {
	c := rep.Cache
	switch {
	case !c.Synced:
		return "its cache has not synced yet"
	case r.svc == nil && c.Found:
		return "its cache still has the Service, which the API no longer has"
	case r.svc != nil && !c.Found:
		return "its cache does not have the Service yet"
	case r.svc == nil:
		return ""
	}
	if !slices.Equal(c.ClusterIPs, clusterIPs(r.svc)) {
		return fmt.Sprintf("it has ClusterIPs %v, the API %v", c.ClusterIPs, clusterIPs(r.svc))
	}
	var api, cached []string
	for _, e := range r.readyEndpoints() {
		api = append(api, e.IP)
	}
	seen := map[string]bool{}
	for _, e := range c.Endpoints {
		if e.Ready && !seen[e.IP] {
			seen[e.IP] = true
			cached = append(cached, e.IP)
		}
	}
	sort.Strings(api)
	sort.Strings(cached)
	if !slices.Equal(api, cached) {
		return fmt.Sprintf("its ready endpoints are [%s], the API's [%s]", strings.Join(cached, " "), strings.Join(api, " "))
	}
	return ""
}

// 5. Are the Service's rules present on the node?
func (r *run) checkRules() Result {
	if r.headless() {
		return Result{Outcome: Skip, Summary: "headless: no rules to check"}
	}
	var ok []string
	for _, n := range r.from {
		rep, err := r.report(n)
		if err != nil {
			continue
		}
		if rep.RulesNote != "" {
			ok = append(ok, n.Name+": "+rep.RulesNote)
			continue
		}
		if len(rep.Ports) == 0 {
			for _, e := range rep.Errors {
				if strings.Contains(e, "nftables") {
					return Result{Outcome: Fail, Summary: fmt.Sprintf("cannot read knit's nftables table on %s: %s", n.Name, e),
						Fix: "knit's proxy programs the table inet knit-proxy: check that it runs on " + n.Name}
				}
			}
			ok = append(ok, n.Name+": rules not inspected (its agent runs no proxy)")
			continue
		}
		for _, pr := range rep.Ports {
			if pr.Local {
				ok = append(ok, fmt.Sprintf("%s: %s:%d/%s is answered on the node itself (knit's DNS), no rules needed", n.Name, pr.ClusterIP, pr.Number, pr.Protocol))
				continue
			}
			res, bad := r.portRulesProblem(n, pr)
			if bad && r.syncRetry > 0 {
				// A Service changed a moment ago may not be programmed yet:
				// ask once more before calling the rules broken.
				time.Sleep(r.syncRetry)
				if again, err := r.env.Agents.Inspect(r.ctx, n, r.t.Namespace, r.t.Name, false); err == nil {
					for _, p2 := range again.Ports {
						if p2.ClusterIP == pr.ClusterIP && p2.Protocol == pr.Protocol && p2.Number == pr.Number {
							res, bad = r.portRulesProblem(n, p2)
						}
					}
				}
			}
			if bad {
				res.Details = append(res.Details, rep.Errors...)
				return res
			}
			ok = append(ok, fmt.Sprintf("%s: %s:%d/%s -> %s: %d endpoint(s)", n.Name, pr.ClusterIP, pr.Number, pr.Protocol, pr.Chain, len(pr.Endpoints)))
		}
	}
	if len(ok) == 0 {
		return Result{Outcome: Skip, Summary: "no node's rules could be inspected"}
	}
	return Result{Outcome: OK, Summary: fmt.Sprintf("the Service's rules are in knit's table on %s", r.fromNames()), Details: ok}
}

func (r *run) portRulesProblem(n *NodeInfo, pr PortRules) (Result, bool) {
	key := fmt.Sprintf("%s . %s . %d", pr.ClusterIP, pr.Protocol, pr.Number)
	fix := fmt.Sprintf("knit replaces its whole table at every full sync (every 10 minutes, and when the agent starts); to repair now, restart knit's agent on %s. "+
		"If the rules go missing again, something else on the node flushes nftables (look for `nft flush ruleset` in other tools)", n.Name)
	var want []string
	for _, sp := range r.svc.Spec.Ports {
		if sp.Name != pr.Port {
			continue
		}
		for _, e := range r.endpoints(sp.Name, false) {
			if e.Ready && (!r.internalLocal() || e.Node == n.Name) {
				want = append(want, hostPort(e.IP, strconv.Itoa(e.Port)))
			}
		}
	}
	sort.Strings(want)
	switch {
	case pr.Map == "" && len(want) > 0:
		return Result{Outcome: Fail,
			Summary: fmt.Sprintf("%s has no rule for %s:%d/%s: the element %q is missing from map %s of knit's table inet knit-proxy",
				n.Name, pr.ClusterIP, pr.Number, pr.Protocol, key, "service-ips"), Fix: fix}, true
	case pr.Map != "" && strings.HasPrefix(pr.Map, "no-endpoint") && len(want) > 0:
		return Result{Outcome: Fail,
			Summary: fmt.Sprintf("%s rejects %s:%d/%s as a Service without endpoints (%s: %s), though the API lists %d ready", n.Name, pr.ClusterIP, pr.Number, pr.Protocol, pr.Map, pr.Verdict, len(want)),
			Fix:     fix}, true
	case len(want) == 0:
		return Result{}, false
	case !pr.ChainFound:
		return Result{Outcome: Fail, Summary: fmt.Sprintf("%s: chain %s, which %s:%d/%s jumps to, is missing from knit's table", n.Name, pr.Chain, pr.ClusterIP, pr.Number, pr.Protocol), Fix: fix}, true
	}
	var missing []string
	for _, w := range want {
		if !slices.Contains(pr.Endpoints, w) {
			missing = append(missing, w)
		}
	}
	if len(missing) > 0 {
		return Result{Outcome: Fail,
			Summary: fmt.Sprintf("%s: the rules for %s:%d/%s (chain %s) lack ready endpoint(s) %s", n.Name, pr.ClusterIP, pr.Number, pr.Protocol, pr.Chain, strings.Join(missing, ", ")),
			Details: []string{"programmed: " + orNone(pr.Endpoints)}, Fix: fix}, true
	}
	return Result{}, false
}

func (r *run) internalLocal() bool {
	p := r.svc.Spec.InternalTrafficPolicy
	return p != nil && *p == corev1.ServiceInternalTrafficPolicyLocal
}

// 6. Does a connection from the node to the ClusterIP and to each
// endpoint succeed?
func (r *run) checkProbes() Result {
	var ok []string
	probed := 0
	for _, n := range r.from {
		rep, err := r.report(n)
		if err != nil {
			continue
		}
		// Endpoints first: when one fails, that is the cause of a failing
		// ClusterIP too.
		eps := 0
		for _, p := range rep.Probes {
			if p.Kind != "endpoint" {
				continue
			}
			probed++
			eps++
			if !p.OK {
				return r.endpointProbeFailed(n, rep, p)
			}
		}
		if eps > 0 {
			ok = append(ok, fmt.Sprintf("%s -> %d endpoint port(s) ok", n.Name, eps))
		}
		for _, p := range rep.Probes {
			if p.Kind != "clusterIP" {
				continue
			}
			probed++
			if !p.OK {
				return Result{Outcome: Fail,
					Summary: fmt.Sprintf("%s cannot connect to the ClusterIP %s (%s), though every endpoint answers it directly: %s", n.Name, p.Target, orUnnamed(p.Port), p.Error),
					Fix:     "the Service's rules on " + n.Name + " do not work as listed; restart knit's agent there so it rewrites its table, and report the rules (nft list table inet knit-proxy) if it persists"}
			}
			ok = append(ok, fmt.Sprintf("%s -> %s ok (%.1f ms)", n.Name, p.Target, p.Millis))
		}
	}
	if probed == 0 {
		return Result{Outcome: Skip, Summary: "nothing probed (UDP-only Service, or no agent reachable from here)"}
	}
	return Result{Outcome: OK, Summary: fmt.Sprintf("connections from %s to the ClusterIP and every ready endpoint succeed", r.fromNames()), Details: ok}
}

func (r *run) endpointProbeFailed(n *NodeInfo, rep *NodeReport, p Probe) Result {
	if host, _, err := net.SplitHostPort(p.Target); err == nil && (p.Pod == "" || p.Node == "") {
		// The agent's cache may keep less of a slice than the API has.
		for _, e := range r.endpoints("", true) {
			if e.IP == host {
				p.Pod, p.Node = cmp.Or(p.Pod, e.Pod), cmp.Or(p.Node, e.Node)
			}
		}
	}
	where := fmt.Sprintf("%s (pod %s on %s)", p.Target, orDash(p.Pod), orDash(p.Node))
	if p.Refused {
		res := Result{Outcome: Fail,
			Summary: fmt.Sprintf("nothing listens on %s: connection refused from %s", where, n.Name),
			Fix:     "point the Service port's targetPort at the port the application listens on"}
		if hint := r.targetPortHint(p); hint != "" {
			res.Summary += "; " + hint
		}
		return res
	}
	// No answer: is the path to that node broken?
	if res, bad := r.routeProblem(n, rep, p.Node); bad {
		res.Summary = fmt.Sprintf("%s gets no answer from %s: %s", n.Name, where, res.Summary)
		return res
	}
	if res, bad := r.forwardBlocked(n.Name, p.Node); bad {
		res.Summary = fmt.Sprintf("%s gets no answer from %s: %s", n.Name, where, res.Summary)
		return res
	}
	return Result{Outcome: Fail,
		Summary: fmt.Sprintf("%s gets no answer from %s: %s", n.Name, where, p.Error),
		Fix:     "knit's routes to that node look right: check the pod itself, and the underlay between " + n.Name + " and " + orDash(p.Node) + " (VXLAN uses UDP 8472)"}
}

// targetPortHint compares the failed target port with the pod's declared
// container ports.
func (r *run) targetPortHint(p Probe) string {
	if p.Pod == "" {
		return ""
	}
	pod, err := getPod(r.ctx, r.env, r.t.Namespace, p.Pod)
	if err != nil || pod == nil {
		return ""
	}
	_, portStr, err := net.SplitHostPort(p.Target)
	if err != nil {
		return ""
	}
	var declared []string
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			if strconv.Itoa(int(cp.ContainerPort)) == portStr {
				return ""
			}
			declared = append(declared, fmt.Sprintf("%d (%s)", cp.ContainerPort, orUnnamed(cp.Name)))
		}
	}
	sp := ""
	for _, s := range r.svc.Spec.Ports {
		if s.Name == p.Port {
			sp = fmt.Sprintf("port %s sends to targetPort %s", orUnnamed(s.Name), s.TargetPort.String())
		}
	}
	if len(declared) == 0 {
		return sp
	}
	return fmt.Sprintf("the Service's %s, but pod %s declares %s: wrong targetPort?", sp, pod.Name, strings.Join(declared, ", "))
}

// routeProblem checks the overlay path from node n to an endpoint's node.
func (r *run) routeProblem(n *NodeInfo, rep *NodeReport, peer string) (Result, bool) {
	if peer == n.Name || peer == "" {
		return Result{}, false
	}
	if st := r.statuses[n.Name]; st != nil && st.Overlay != nil {
		for _, p := range st.Overlay.Peers {
			if p.Node == peer && p.Skipped != "" && p.Via == "" {
				return Result{Outcome: Fail,
					Summary: fmt.Sprintf("knit's overlay on %s skips %s: %s", n.Name, peer, p.Skipped),
					Fix:     fmt.Sprintf("%s publishes its VTEP in overlay.knit.dev/* annotations and needs a podCIDR; check knit's agent on %s and its Node object", peer, peer)}, true
			}
		}
	}
	for _, rc := range rep.Routes {
		if rc.Node != peer || rc.Local {
			continue
		}
		peerCIDR := strings.Join(r.nodes[peer].podCIDRs(), ", ")
		fix := fmt.Sprintf("knit's overlay puts a deleted route back within a second (and at every sync); if it keeps disappearing, something else on %s removes routes (another CNI, a network manager)", n.Name)
		if st := r.statuses[n.Name]; st != nil && st.Overlay == nil {
			fix = fmt.Sprintf("knit's overlay does not run on %s (its agent's --components), so nothing programs routes to other nodes' pods there: enable it, or route the podCIDRs another way", n.Name)
		}
		switch {
		case rc.Knit && rc.Shadowed:
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s has knit's route %s dev %s, but sends %s %s: a more specific route or a routing rule takes precedence", n.Name, rc.Dst, rc.Dev, rc.IP, rc.Actual),
				Fix:     fmt.Sprintf("find it with `ip route get %s` and `ip rule` on %s and remove it; it is not knit's (knit's routes are proto 75)", rc.IP, n.Name)}, true
		case !rc.Knit:
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s has no knit route to %s's pod network %s: packets for %s go %s instead", n.Name, peer, peerCIDR, rc.IP, orDash(rc.Actual)),
				Fix:     fix}, true
		case rc.Neigh != nil && !*rc.Neigh:
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s routes %s via %s dev %s, but has no neighbour entry for %s (the VTEP of %s)", n.Name, rc.Dst, rc.Gateway, rc.Dev, rc.Gateway, peer),
				Fix:     fix}, true
		case rc.FDB != nil && !*rc.FDB:
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("%s has no FDB entry on %s for %s's VTEP: it does not know where to send the encapsulated packets", n.Name, rc.Dev, peer),
				Fix:     fix}, true
		}
	}
	return Result{}, false
}

// forwardBlocked reports a native nftables firewall on the nodes of a path
// whose forward chain drops by default: packets to a pod on another node
// are forwarded there, and knit's iptables accept rules cannot override a
// drop in someone else's nftables chain.
func (r *run) forwardBlocked(nodes ...string) (Result, bool) {
	for _, name := range nodes {
		st := r.statuses[name]
		if st == nil || st.Overlay == nil || len(st.Overlay.ForwardBlocked) == 0 {
			continue
		}
		chains := strings.Join(st.Overlay.ForwardBlocked, ", ")
		return Result{Outcome: Fail,
			Summary: fmt.Sprintf("%s has an nftables forward chain with policy drop (%s): it may drop pod traffic that node forwards, and knit's FORWARD accept rules cannot override it", name, chains),
			Fix:     fmt.Sprintf("on %s, accept the cluster CIDR in that chain (e.g. ip saddr <cluster CIDR> accept; ip daddr <cluster CIDR> accept; ct state established,related accept)", name)}, true
	}
	return Result{}, false
}

func (n *NodeInfo) podCIDRs() []string {
	if n == nil {
		return nil
	}
	return n.PodCIDRs
}

// 7. Are the overlay peers programmed and the MTU consistent along the
// path?
func (r *run) checkOverlay() Result {
	var ok []string
	for _, n := range r.from {
		rep, err := r.report(n)
		if err != nil {
			continue
		}
		peers := map[string]bool{}
		for _, rc := range rep.Routes {
			if !rc.Local && rc.Node != "" {
				peers[rc.Node] = true
			}
		}
		for _, peer := range sortedKeys(peers) {
			if res, bad := r.routeProblem(n, rep, peer); bad {
				return res
			}
			ok = append(ok, fmt.Sprintf("%s -> %s: routed", n.Name, peer))
		}
		for _, m := range rep.MTU {
			switch {
			case m.SmallOK && !m.BigOK:
				return r.mtuProblem(n, rep, m)
			case m.SmallOK:
				ok = append(ok, fmt.Sprintf("%s -> %s on %s: %d-byte packets arrive", n.Name, m.Target, m.Node, m.Size))
			default:
				ok = append(ok, fmt.Sprintf("%s -> %s on %s: MTU not measured (no ICMP answer even to small packets)", n.Name, m.Target, m.Node))
			}
		}
	}
	if res, bad := r.mtuMismatch(); bad {
		return res
	}
	if len(ok) == 0 {
		return Result{Outcome: OK, Summary: "no cross-node path involved"}
	}
	return Result{Outcome: OK, Summary: "overlay routes to the endpoints' nodes are programmed and full-size packets arrive", Details: ok}
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// mtuProblem explains a full-size probe that was lost where a small one
// arrived, from the MTUs of the devices on both ends.
func (r *run) mtuProblem(n *NodeInfo, rep *NodeReport, m MTUProbe) Result {
	res := Result{Outcome: Fail,
		Summary: fmt.Sprintf("%d-byte packets from %s to %s on %s are lost while small ones arrive: the path MTU is below the pod MTU", m.Size, n.Name, m.Target, m.Node),
		Fix:     "give every node's underlay interface the same MTU; knit derives the pod MTU from it (underlay − 50 bytes for VXLAN over IPv4) and applies it to new pods"}
	src := linkMTU(rep.Links, RoleVXLAN)
	overhead := 50
	if st := r.statuses[n.Name]; st != nil && st.Overlay != nil && st.Overlay.Overhead > 0 {
		overhead = st.Overlay.Overhead
	}
	if src == 0 {
		src = m.Size
		overhead = 0
	}
	for _, node := range []string{n.Name, m.Node} {
		links := rep.Links
		if node != n.Name {
			other := r.reports[node]
			if other == nil {
				continue
			}
			links = other.Links
		}
		for _, l := range links {
			if l.Role == RoleUnderlay && l.MTU < src+overhead {
				res.Summary += fmt.Sprintf("; %s's underlay interface %s has MTU %d, but %s's %d-byte pod packets are %d bytes once encapsulated",
					node, l.Name, l.MTU, n.Name, src, src+overhead)
				return res
			}
		}
	}
	res.Details = append(res.Details, "no device on either node explains it: a link or router between them has a smaller MTU")
	return res
}

// mtuMismatch compares the MTUs of the involved nodes' devices: a pod
// packet of one node's pod MTU, once encapsulated, must fit every other
// node's underlay (and its own).
func (r *run) mtuMismatch() (Result, bool) {
	type nodeMTU struct {
		node            string
		vxlan, underlay int
		dev             string
	}
	var all []nodeMTU
	for _, n := range r.involved {
		rep := r.reports[n.Name]
		if rep == nil {
			continue
		}
		m := nodeMTU{node: n.Name, vxlan: linkMTU(rep.Links, RoleVXLAN), underlay: linkMTU(rep.Links, RoleUnderlay)}
		for _, l := range rep.Links {
			if l.Role == RoleUnderlay {
				m.dev = l.Name
			}
		}
		if m.vxlan > 0 && m.underlay > 0 {
			all = append(all, m)
		}
	}
	const overhead = 50 // VXLAN over IPv4; the smallest, so no false alarm over IPv6
	for _, a := range all {
		for _, b := range all {
			if a.vxlan+overhead <= b.underlay {
				continue
			}
			who := fmt.Sprintf("%s's pods", a.node)
			if a.node == b.node {
				who = "its own pods"
			}
			return Result{Outcome: Fail,
				Summary: fmt.Sprintf("MTU inconsistent along the path: %s's underlay interface %s has MTU %d, but %s send %d-byte packets (%d once VXLAN-encapsulated)",
					b.node, b.dev, b.underlay, who, a.vxlan, a.vxlan+overhead),
				Fix: "give every node's underlay interface the same MTU; knit derives the pod MTU from it (underlay − 50 bytes for VXLAN over IPv4), and pods created before a change keep the old MTU until they are recreated"}, true
		}
	}
	return Result{}, false
}

func linkMTU(links []Link, role string) int {
	for _, l := range links {
		if l.Role == role {
			return l.MTU
		}
	}
	return 0
}
