package doctor

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/status"
)

// ClusterView is what `knit status` shows: every node from the API with
// its agent's published summary, and each reachable agent's full status.
type ClusterView struct {
	Time  time.Time  `json:"time"`
	Nodes []NodeView `json:"nodes"`
	// From the API server: Services with a ClusterIP (not headless or
	// ExternalName) and their ready endpoints.
	Services            int      `json:"services"`
	ReadyEndpoints      int      `json:"readyEndpoints"`
	ServicesNoEndpoints []string `json:"servicesWithoutEndpoints,omitempty"`
}

// NodeView is one node.
type NodeView struct {
	NodeInfo
	Detail      *status.Node `json:"detail,omitempty"`
	DetailError string       `json:"detailError,omitempty"`
}

// Status gathers the cluster view. Agents that cannot be reached are
// shown from their Lease summary alone.
func Status(ctx context.Context, env *Env) (*ClusterView, error) {
	nodes, err := env.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	v := &ClusterView{Time: env.now()}
	v.Nodes = make([]NodeView, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		v.Nodes[i].NodeInfo = *n
		if n.URL == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := env.Agents.Status(ctx, n)
			if err != nil {
				v.Nodes[i].DetailError = err.Error()
				return
			}
			v.Nodes[i].Detail = st
		}()
	}
	svcs, err := env.Client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		wg.Wait()
		return nil, fmt.Errorf("list services: %w", err)
	}
	slices, err := env.Client.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		wg.Wait()
		return nil, fmt.Errorf("list endpointslices: %w", err)
	}
	ready := map[string]int{}
	for _, s := range slices.Items {
		svc := s.Namespace + "/" + s.Labels[discoveryv1.LabelServiceName]
		for _, e := range s.Endpoints {
			if e.Conditions.Ready == nil || *e.Conditions.Ready {
				ready[svc] += len(e.Addresses)
			}
		}
	}
	for _, s := range svcs.Items {
		if s.Spec.ClusterIP == "" || s.Spec.ClusterIP == "None" || len(s.Spec.Selector) == 0 {
			continue
		}
		v.Services++
		key := s.Namespace + "/" + s.Name
		v.ReadyEndpoints += ready[key]
		if ready[key] == 0 {
			v.ServicesNoEndpoints = append(v.ServicesNoEndpoints, key)
		}
	}
	sort.Strings(v.ServicesNoEndpoints)
	wg.Wait()
	return v, nil
}

// WriteTable prints the view for people: one line per node, then the
// per-node detail of the agents the CLI reached.
func (v *ClusterView) WriteTable(w io.Writer) {
	now := v.Time
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tINTERNAL-IP\tPOD-CIDRS\tAGENT\tSEEN\tOVERLAY\tMTU\tSERVICES\tENDPOINTS\tDNS\tINGRESS\tPROBLEMS")
	for _, n := range v.Nodes {
		s := n.Summary
		overlay, mtu, svcs, eps, dns, ing := "-", "-", "-", "-", "-", "-"
		if n.Detail != nil {
			sum := status.Summarize(n.Detail, status.StateRunning)
			s = &sum
		}
		if s != nil {
			if s.Backend != "" {
				overlay = fmt.Sprintf("%s %d/%d", s.Backend, s.PeersRouted, s.PeersKnown)
			}
			if s.PodMTU > 0 {
				mtu = fmt.Sprintf("%d/%d", s.PodMTU, s.UnderlayMTU)
			}
			if has(s.Components, "proxy") {
				svcs, eps = fmt.Sprint(s.Services), fmt.Sprint(s.Endpoints)
			}
			dns = componentCell(s, "dns", fmt.Sprintf("%d names", s.DNSNames))
			ing = componentCell(s, "ingress", fmt.Sprintf("%d ing", s.Ingresses))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, orDash(n.IP), orDash(strings.Join(n.PodCIDRs, ",")),
			n.Agent, ago(now, n.LastSeen), overlay, mtu, svcs, eps, dns, ing, problemsCell(&n))
	}
	tw.Flush()
	fmt.Fprintf(w, "\nServices: %d with a ClusterIP and a selector, %d ready endpoints", v.Services, v.ReadyEndpoints)
	if len(v.ServicesNoEndpoints) > 0 {
		fmt.Fprintf(w, "; without ready endpoints: %s", strings.Join(v.ServicesNoEndpoints, ", "))
	}
	fmt.Fprintln(w)
	for _, n := range v.Nodes {
		fmt.Fprintf(w, "\n%s:", n.Name)
		switch {
		case n.Detail != nil:
			fmt.Fprintf(w, " agent %s, up %s\n", n.Detail.Agent, n.Detail.Time.Sub(n.Detail.Started).Round(time.Second))
			writeDetail(w, n.Detail)
		case n.DetailError != "":
			fmt.Fprintf(w, " agent not reachable: %s\n", n.DetailError)
		default:
			fmt.Fprintf(w, " no detail: %s\n", orDash(n.Unreachable))
		}
	}
}

func has(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func componentCell(s *status.Summary, name, ok string) string {
	if !has(s.Components, name) {
		return "off"
	}
	if has(s.NotReady, name) {
		return "NOT READY"
	}
	for _, e := range s.Errors {
		if strings.HasPrefix(e, name+":") {
			return "ERROR"
		}
	}
	return ok
}

func problemsCell(n *NodeView) string {
	var p []string
	switch {
	case n.Detail != nil:
		p = n.Detail.Problems()
	case n.Summary != nil:
		for _, c := range n.Summary.NotReady {
			p = append(p, c+" not ready")
		}
		p = append(p, n.Summary.Errors...)
	}
	if n.Agent != status.StateRunning {
		p = append([]string{"agent " + n.Agent}, p...)
	}
	if !n.Ready {
		p = append(p, "Node not Ready")
	}
	if len(p) == 0 {
		return "-"
	}
	s := strings.Join(p, "; ")
	if len(s) > 80 {
		s = s[:77] + "..."
	}
	return s
}

func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t).Round(time.Second)
	if d < 0 {
		d = 0
	}
	return d.String() + " ago"
}

func writeDetail(w io.Writer, d *status.Node) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	syncs := map[string]status.Sync{}
	for _, s := range d.Syncs() {
		syncs[s.Name] = s.Sync
	}
	for _, c := range d.Components {
		ready := "ready"
		if !c.Ready {
			ready = "NOT READY"
		}
		sy := syncs[c.Name]
		line := fmt.Sprintf("  %s\t%s\tlast sync %s", c.Name, ready, ago(d.Time, sy.LastSync))
		if c.Restarts > 0 {
			line += fmt.Sprintf("\trestarts %d (last: %s)", c.Restarts, c.LastError)
		}
		if sy.LastError != "" {
			line += "\tERROR " + ago(d.Time, sy.LastFailure) + ": " + sy.LastError
		}
		line += "\t" + componentFacts(d, c.Name)
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
	if o := d.Overlay; o != nil {
		for _, p := range o.Peers {
			via := p.Via
			if via == "" {
				via = "NOT ROUTED: " + p.Skipped
			}
			fmt.Fprintf(w, "    peer %s %s: %s\n", p.Node, strings.Join(p.PodCIDRs, ","), via)
		}
	}
	if i := d.Ingress; i != nil {
		for _, p := range i.Problems {
			fmt.Fprintf(w, "    ingress problem: %s\n", p)
		}
	}
}

func componentFacts(d *status.Node, name string) string {
	switch name {
	case "cni":
		if c := d.CNI; c != nil {
			s := fmt.Sprintf("podCIDRs %s, bridge %s, pod MTU %d", orDash(strings.Join(c.PodCIDRs, ",")), c.Bridge, c.MTU)
			if c.Waiting != "" {
				s += ", waiting for " + c.Waiting
			}
			return s
		}
	case "overlay":
		if o := d.Overlay; o != nil {
			s := fmt.Sprintf("%s, %d peers, MTU pod %d / underlay %d", o.Backend, o.PeersKnown, o.PodMTU, o.UnderlayMTU)
			if o.Waiting != "" {
				s += ", waiting for " + o.Waiting
			}
			if len(o.ForwardBlocked) > 0 {
				s += ", nftables forward chain(s) with policy drop: " + strings.Join(o.ForwardBlocked, ", ") + " (may drop pod traffic; knit cannot override them)"
			}
			return s
		}
	case "proxy":
		if p := d.Proxy; p != nil {
			return fmt.Sprintf("%s (%s): %d services, %d endpoints, %d rules; last full sync %s", p.Backend, p.Table, p.Services, p.Endpoints, p.Rules, ago(d.Time, p.LastFullSync))
		}
	case "dns":
		if s := d.DNS; s != nil {
			return fmt.Sprintf("%s on %s, %d names, upstreams %s", s.Domain, strings.Join(s.Listen, ","), s.Names, orDash(strings.Join(s.Upstreams, ",")))
		}
	case "ingress":
		if i := d.Ingress; i != nil {
			return fmt.Sprintf("http %s https %s: %d ingresses, %d routes, %d problems", orDash(i.HTTP), orDash(i.HTTPS), i.Ingresses, i.Routes, len(i.Problems))
		}
	}
	return ""
}

// WriteText prints a doctor report for people.
func (rep *Report) WriteText(w io.Writer) {
	fmt.Fprintf(w, "knit doctor %s (probes from %s)\n\n", rep.Service, orNone(rep.From))
	marks := map[Outcome]string{OK: "ok  ", Fail: "FAIL", Warn: "warn", Skip: "-   "}
	for i, r := range rep.Results {
		fmt.Fprintf(w, "%d. %s %-9s %s\n", i+1, marks[r.Outcome], r.Check, r.Summary)
		for _, d := range r.Details {
			fmt.Fprintf(w, "              %s\n", d)
		}
	}
	fmt.Fprintln(w)
	if v := rep.Verdict; v != nil {
		fmt.Fprintf(w, "Broken at %q: %s\n", v.Check, v.Summary)
		if v.Fix != "" {
			fmt.Fprintf(w, "Try: %s\n", v.Fix)
		}
		return
	}
	fmt.Fprintln(w, "Every check passed.")
}
