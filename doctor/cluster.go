package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"knit.dev/knit/cluster"
	"knit.dev/knit/status"
)

// NodeInfo is one node as the API server shows it, with its agent's
// published summary and how (or why not) the CLI can reach the agent.
type NodeInfo struct {
	Name     string   `json:"name"`
	IP       string   `json:"internalIP,omitempty"`
	PodCIDRs []string `json:"podCIDRs,omitempty"`
	Ready    bool     `json:"nodeReady"`

	// Agent is "running", "stopped", "stale" (no renewal for longer than
	// the Lease duration) or "unknown" (no Lease).
	Agent     string          `json:"agent"`
	LastSeen  time.Time       `json:"lastSeen,omitzero"`
	Summary   *status.Summary `json:"summary,omitempty"`
	LeaseNote string          `json:"leaseNote,omitempty"`

	// URL is the agent's health listener when the CLI can reach it;
	// Unreachable says why not otherwise.
	URL         string `json:"url,omitempty"`
	Unreachable string `json:"unreachable,omitempty"`
}

// Agents talks to node agents.
type Agents interface {
	Status(ctx context.Context, n *NodeInfo) (*status.Node, error)
	Inspect(ctx context.Context, n *NodeInfo, namespace, name string, probe bool) (*NodeReport, error)
}

// Env is what the CLI side needs: the API, the agents, and where the
// status Leases live.
type Env struct {
	Client          kubernetes.Interface
	Agents          Agents
	StatusNamespace string
	// AgentPort is used when a node has no summary saying where its agent
	// listens (default 9940).
	AgentPort int
	// LocalAddrs are this machine's addresses: an agent bound to loopback
	// is reachable only from its own node. Nil: none.
	LocalAddrs func() []netip.Addr
	Now        func() time.Time
}

func (e *Env) now() time.Time {
	if e.Now != nil {
		return e.Now()
	}
	return time.Now()
}

// Nodes lists every Node with its agent's Lease summary.
func (e *Env) Nodes(ctx context.Context) ([]*NodeInfo, error) {
	nodes, err := e.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	leases := map[string]*leaseInfo{}
	if e.StatusNamespace != "" {
		ls, err := e.Client.CoordinationV1().Leases(e.StatusNamespace).List(ctx, metav1.ListOptions{LabelSelector: status.LeaseLabel + "=true"})
		switch {
		case err == nil:
			for i := range ls.Items {
				l := &ls.Items[i]
				li := &leaseInfo{}
				if l.Spec.RenewTime != nil {
					li.renew = l.Spec.RenewTime.Time
				}
				if l.Spec.LeaseDurationSeconds != nil {
					li.duration = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
				}
				var s status.Summary
				if err := json.Unmarshal([]byte(l.Annotations[status.SummaryAnnotation]), &s); err != nil {
					li.err = "unreadable summary: " + err.Error()
				} else {
					li.sum = &s
				}
				leases[strings.TrimPrefix(l.Name, status.LeasePrefix)] = li
			}
		case apierrors.IsForbidden(err):
			return nil, fmt.Errorf("reading knit's status Leases in %s: %w", e.StatusNamespace, err)
		case apierrors.IsNotFound(err):
		default:
			return nil, fmt.Errorf("list status Leases: %w", err)
		}
	}
	var local []netip.Addr
	if e.LocalAddrs != nil {
		local = e.LocalAddrs()
	}
	var out []*NodeInfo
	for i := range nodes.Items {
		n := &nodes.Items[i]
		ni := &NodeInfo{Name: n.Name, Agent: "unknown", PodCIDRs: n.Spec.PodCIDRs}
		if len(ni.PodCIDRs) == 0 && n.Spec.PodCIDR != "" {
			ni.PodCIDRs = []string{n.Spec.PodCIDR}
		}
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP && ni.IP == "" {
				ni.IP = a.Address
			}
		}
		ni.Ready = cluster.NodeReady(n)
		if li := leases[n.Name]; li != nil {
			ni.LastSeen, ni.Summary, ni.LeaseNote = li.renew, li.sum, li.err
			switch {
			case li.sum != nil && li.sum.State == status.StateStopped:
				ni.Agent = status.StateStopped
			case li.duration > 0 && e.now().Sub(li.renew) > li.duration:
				ni.Agent = "stale"
			default:
				ni.Agent = status.StateRunning
			}
		}
		e.reach(ni, local)
		out = append(out, ni)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

type leaseInfo struct {
	renew    time.Time
	duration time.Duration
	sum      *status.Summary
	err      string
}

// reach works out the agent's URL from the address it says it listens on.
func (e *Env) reach(ni *NodeInfo, local []netip.Addr) {
	port := e.AgentPort
	if port == 0 {
		port = 9940
	}
	addr := net.JoinHostPort("", fmt.Sprint(port))
	if ni.Summary != nil && ni.Summary.HealthAddr != "" {
		addr = ni.Summary.HealthAddr
	}
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		ni.Unreachable = "unusable health address " + addr
		return
	}
	ip, _ := netip.ParseAddr(host)
	nodeIP, _ := netip.ParseAddr(ni.IP)
	isLocal := false
	for _, a := range local {
		if a == nodeIP {
			isLocal = true
		}
	}
	switch {
	case host == "" || ip.IsUnspecified():
		if !nodeIP.IsValid() {
			ni.Unreachable = "the node has no InternalIP"
			return
		}
		host = nodeIP.String()
	case ip.IsLoopback() && !isLocal:
		ni.Unreachable = fmt.Sprintf("its agent listens on %s only; run knit on that node (kubectl -n %s exec <knit pod on %s> -- knit ...) or give the agent --health-addr=0.0.0.0:%s",
			addr, e.StatusNamespace, ni.Name, p)
		return
	}
	ni.URL = "http://" + net.JoinHostPort(host, p)
}

// HTTPAgents reaches agents over their health listener.
type HTTPAgents struct {
	Client *http.Client
}

func (h HTTPAgents) client() *http.Client {
	if h.Client != nil {
		return h.Client
	}
	return &http.Client{Timeout: 60 * time.Second}
}

// Status implements Agents.
func (h HTTPAgents) Status(ctx context.Context, n *NodeInfo) (*status.Node, error) {
	var doc status.Node
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return &doc, h.get(ctx, n, "/status", &doc)
}

// Inspect implements Agents.
func (h HTTPAgents) Inspect(ctx context.Context, n *NodeInfo, namespace, name string, probe bool) (*NodeReport, error) {
	var rep NodeReport
	path := "/debug/service/" + url.PathEscape(namespace) + "/" + url.PathEscape(name)
	if probe {
		path += "?probe=1"
	}
	return &rep, h.get(ctx, n, path, &rep)
}

func (h HTTPAgents) get(ctx context.Context, n *NodeInfo, path string, into any) error {
	if n.URL == "" {
		return fmt.Errorf("cannot reach the agent on %s: %s", n.Name, n.Unreachable)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.URL+path, nil)
	if err != nil {
		return err
	}
	resp, err := h.client().Do(req)
	if err != nil {
		return fmt.Errorf("agent on %s: %w", n.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("agent on %s: %w", n.Name, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent on %s: %s: %s", n.Name, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, into); err != nil {
		return fmt.Errorf("agent on %s: %w", n.Name, err)
	}
	return nil
}

// LocalAddrs lists this machine's interface addresses.
func LocalAddrs() []netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr())
		}
	}
	return out
}
