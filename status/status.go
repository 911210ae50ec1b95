// Package status is the vocabulary of what a knit agent says about itself:
// the per-node status document, and the compact summary of it that the
// agent publishes through the API server. It holds types only (standard
// library imports only), so the components that fill it in, the agent that
// serves it, and the CLI (`knit status`, `knit doctor`) that reads it all
// share one schema without depending on each other.
//
// How the data flows:
//
//	each component: Status() -> its section (Overlay, Proxy, ...) from what
//	    its sync loop already keeps (last sync, last error, counts); cheap,
//	    no kernel or API calls
//	agent: Node document = sections + supervisor facts (ready, restarts)
//	    GET /status on the health listener           -> the full document
//	    Lease knit-system/knit-node-<node>, annotation status.knit.dev/summary
//	        -> Summary (no per-peer lists), renewed with fresh counters every
//	           RenewInterval, and written at once (at most every
//	           MinPublishInterval) when the node's own state changes (SameState)
//	`knit status` / `knit doctor`:
//	    cluster view: Nodes + Leases from the API (works with a kubeconfig only)
//	    node detail:  GET /status from each agent it can reach
package status

import (
	"fmt"
	"reflect"
	"strings"
	"sync"
	"time"
)

// Version of the document schema; bumped on incompatible changes.
const Version = 1

// Lease naming and the annotation the summary travels in.
const (
	// DefaultNamespace holds the per-node Leases (the DaemonSet's namespace).
	DefaultNamespace = "knit-system"
	// LeasePrefix + node name is the node's Lease.
	LeasePrefix = "knit-node-"
	// SummaryAnnotation on the Lease carries the JSON Summary.
	SummaryAnnotation = "status.knit.dev/summary"
	// LeaseLabel marks knit's node Leases, so a list can select them.
	LeaseLabel = "status.knit.dev/node-lease"
	// RenewInterval is how often an agent renews its Lease when nothing
	// changed; the Lease's duration is three times that.
	RenewInterval = time.Minute
	// MinPublishInterval bounds how often a changing summary is written.
	MinPublishInterval = 10 * time.Second
)

// LeaseName is the name of a node's status Lease.
func LeaseName(node string) string { return LeasePrefix + node }

// Node is the full status document an agent serves at /status.
type Node struct {
	Version    int       `json:"version"`
	Node       string    `json:"node"`
	Agent      string    `json:"agent"` // knit version
	Time       time.Time `json:"time"`
	Started    time.Time `json:"started"`
	HealthAddr string    `json:"healthAddr"`

	Components []Component `json:"components"`

	CNI     *CNI     `json:"cni,omitempty"`
	Overlay *Overlay `json:"overlay,omitempty"`
	Proxy   *Proxy   `json:"proxy,omitempty"`
	DNS     *DNS     `json:"dns,omitempty"`
	Ingress *Ingress `json:"ingress,omitempty"`
}

// Component is the supervisor's view of one component.
type Component struct {
	Name      string `json:"name"`
	Ready     bool   `json:"ready"`
	Restarts  int    `json:"restarts,omitempty"`
	LastError string `json:"lastError,omitempty"` // the last failed Run
}

// Sync is what every component's sync loop reports.
type Sync struct {
	LastSync    time.Time `json:"lastSync,omitzero"`    // last sync attempt that succeeded
	LastFailure time.Time `json:"lastFailure,omitzero"` // last sync that failed
	LastError   string    `json:"lastError,omitempty"`  // its error; "" once a later sync succeeded
}

// Healthy reports whether the last sync succeeded.
func (s Sync) Healthy() bool { return s.LastError == "" }

// CNI is the node setup's section.
type CNI struct {
	Sync
	PodCIDRs []string `json:"podCIDRs"`
	Bridge   string   `json:"bridge"`
	MTU      int      `json:"mtu"`               // the pod MTU written into node.json
	Waiting  string   `json:"waiting,omitempty"` // what the setup waits for, if anything
}

// Overlay is the overlay's section.
type Overlay struct {
	Sync
	Backend     string   `json:"backend"`
	VNI         int      `json:"vni,omitempty"`
	Port        int      `json:"port,omitempty"`
	PodCIDRs    []string `json:"podCIDRs"`
	UnderlayMTU int      `json:"underlayMTU"` // MTU of the underlay interface (IPv4 if both)
	PodMTU      int      `json:"podMTU"`      // the MTU pods get: underlay less encapsulation
	Overhead    int      `json:"overhead"`    // bytes the encapsulation adds (0 for direct)
	Devices     []Device `json:"devices,omitempty"`
	PeersKnown  int      `json:"peersKnown"`
	Peers       []Peer   `json:"peers,omitempty"`
	Waiting     string   `json:"waiting,omitempty"`
	// ForwardBlocked lists native nftables forward base chains with
	// policy drop ("inet filter forward"): they may drop pod traffic
	// between nodes, and knit's iptables FORWARD accept rules cannot
	// override them.
	ForwardBlocked []string `json:"forwardBlocked,omitempty"`
}

// Device is one VXLAN device.
type Device struct {
	Name  string `json:"name"`
	MTU   int    `json:"mtu"`
	Local string `json:"local"` // underlay address the tunnel is sourced from
	MAC   string `json:"mac"`
}

// Peer is one other node as the overlay programs it.
type Peer struct {
	Node     string   `json:"node"`
	PodCIDRs []string `json:"podCIDRs,omitempty"`
	Via      string   `json:"via,omitempty"`     // vxlan, direct, mixed; "" when skipped
	Skipped  string   `json:"skipped,omitempty"` // why the peer (or a family of it) got no routes
}

// Proxy is the service proxy's section.
type Proxy struct {
	Sync
	Backend      string    `json:"backend"`
	Table        string    `json:"table"`
	LastFullSync time.Time `json:"lastFullSync,omitzero"`
	Services     int       `json:"services"`  // Services with rules
	Endpoints    int       `json:"endpoints"` // endpoints in those rules (per port and family)
	Rules        int       `json:"rules"`
}

// DNS is the cluster DNS's section.
type DNS struct {
	Sync
	Listen    []string `json:"listen"`
	Domain    string   `json:"domain"`
	Names     int      `json:"names"` // published cluster names
	Upstreams []string `json:"upstreams,omitempty"`
}

// Ingress is the ingress's section.
type Ingress struct {
	Sync
	HTTP      string   `json:"http,omitempty"`
	HTTPS     string   `json:"https,omitempty"`
	Ingresses int      `json:"ingresses"` // Ingresses of knit's classes served
	Routes    int      `json:"routes"`
	Problems  []string `json:"problems,omitempty"` // "ns/name: reason: message"
}

// Summary is the compact form published on the node's Lease: what the
// cluster view needs, without per-peer lists, so that it stays small at
// 5,000 nodes. State is "running" or "stopped" (written on a clean stop).
type Summary struct {
	Version    int       `json:"v"`
	Node       string    `json:"node"`
	Agent      string    `json:"agent"`
	State      string    `json:"state"`
	Started    time.Time `json:"started"`
	HealthAddr string    `json:"healthAddr"`
	// NotReady lists components that are not Ready; Errors the last sync
	// error of each component that has one ("proxy: ...").
	Components []string `json:"components"`
	NotReady   []string `json:"notReady,omitempty"`
	Errors     []string `json:"errors,omitempty"`

	PodCIDRs    []string  `json:"podCIDRs,omitempty"`
	Backend     string    `json:"backend,omitempty"`
	PeersKnown  int       `json:"peersKnown,omitempty"`
	PeersRouted int       `json:"peersRouted,omitempty"`
	UnderlayMTU int       `json:"underlayMTU,omitempty"`
	PodMTU      int       `json:"podMTU,omitempty"`
	Services    int       `json:"services,omitempty"`
	Endpoints   int       `json:"endpoints,omitempty"`
	ProxySync   time.Time `json:"proxySync,omitzero"`
	DNSNames    int       `json:"dnsNames,omitempty"`
	Ingresses   int       `json:"ingresses,omitempty"`
}

// States of a Summary.
const (
	StateRunning = "running"
	StateStopped = "stopped"
)

// Summarize compacts a Node document. Times that change on every sync are
// left out (except the proxy's, rounded to the minute), so that an
// unchanged node yields an identical Summary; see SameState for what
// makes an agent write its Lease before the periodic renewal.
func Summarize(n *Node, state string) Summary {
	s := Summary{Version: Version, Node: n.Node, Agent: n.Agent, State: state, Started: n.Started.UTC().Truncate(time.Second), HealthAddr: n.HealthAddr}
	for _, c := range n.Components {
		s.Components = append(s.Components, c.Name)
		if !c.Ready {
			s.NotReady = append(s.NotReady, c.Name)
		}
	}
	addErr := func(name string, sy Sync) {
		if sy.LastError != "" {
			s.Errors = append(s.Errors, name+": "+truncate(sy.LastError, 200))
		}
	}
	if c := n.CNI; c != nil {
		addErr("cni", c.Sync)
		s.PodCIDRs = c.PodCIDRs
	}
	if o := n.Overlay; o != nil {
		addErr("overlay", o.Sync)
		s.Backend, s.PeersKnown, s.UnderlayMTU, s.PodMTU = o.Backend, o.PeersKnown, o.UnderlayMTU, o.PodMTU
		if len(s.PodCIDRs) == 0 {
			s.PodCIDRs = o.PodCIDRs
		}
		for _, p := range o.Peers {
			if p.Via != "" {
				s.PeersRouted++
			}
		}
	}
	if p := n.Proxy; p != nil {
		addErr("proxy", p.Sync)
		s.Services, s.Endpoints = p.Services, p.Endpoints
		s.ProxySync = p.LastSync.UTC().Truncate(time.Minute)
	}
	if d := n.DNS; d != nil {
		addErr("dns", d.Sync)
		s.DNSNames = d.Names
	}
	if i := n.Ingress; i != nil {
		addErr("ingress", i.Sync)
		s.Ingresses = i.Ingresses
	}
	return s
}

// SameState reports whether two summaries differ only in counters (peers,
// Services, endpoints, names, Ingresses, the proxy's sync minute). Those
// change with every Service or Node anywhere in the cluster; an agent
// publishes them with its periodic renewal only, so that one change does
// not make every node write its Lease at once.
func (s Summary) SameState(o Summary) bool {
	strip := func(x Summary) Summary {
		x.PeersKnown, x.PeersRouted, x.Services, x.Endpoints, x.DNSNames, x.Ingresses = 0, 0, 0, 0, 0, 0
		x.ProxySync = time.Time{}
		return x
	}
	return reflect.DeepEqual(strip(s), strip(o))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Problems lists what is wrong with a node according to its document, one
// plain sentence each; empty means healthy.
func (n *Node) Problems() []string {
	out := n.Unhealthy()
	if o := n.Overlay; o != nil {
		var skipped []string
		for _, p := range o.Peers {
			if p.Skipped != "" {
				skipped = append(skipped, p.Node+" ("+p.Skipped+")")
			}
		}
		if len(skipped) > 0 {
			out = append(out, "overlay: peers without routes: "+strings.Join(skipped, ", "))
		}
	}
	return out
}

// Unhealthy lists the components that are not ready and the last sync
// errors: what says the agent itself is not doing its job.
func (n *Node) Unhealthy() []string {
	var out []string
	for _, c := range n.Components {
		if !c.Ready {
			msg := c.Name + " is not ready"
			if c.LastError != "" {
				msg += " (last error: " + c.LastError + ")"
			}
			out = append(out, msg)
		}
	}
	for _, s := range n.Syncs() {
		if s.LastError != "" {
			out = append(out, fmt.Sprintf("%s: last sync failed at %s: %s", s.Name, s.LastFailure.UTC().Format(time.RFC3339), s.LastError))
		}
	}
	return out
}

// NamedSync is one component's Sync with its name.
type NamedSync struct {
	Name string
	Sync
}

// Syncs lists the sync state of each component section present, in
// start order.
func (n *Node) Syncs() []NamedSync {
	var out []NamedSync
	if n.CNI != nil {
		out = append(out, NamedSync{"cni", n.CNI.Sync})
	}
	if n.Overlay != nil {
		out = append(out, NamedSync{"overlay", n.Overlay.Sync})
	}
	if n.Proxy != nil {
		out = append(out, NamedSync{"proxy", n.Proxy.Sync})
	}
	if n.DNS != nil {
		out = append(out, NamedSync{"dns", n.DNS.Sync})
	}
	if n.Ingress != nil {
		out = append(out, NamedSync{"ingress", n.Ingress.Sync})
	}
	return out
}

// SyncRecorder keeps a component's Sync; the sync loop records each
// outcome, Status reads it from any goroutine.
type SyncRecorder struct {
	mu sync.Mutex
	s  Sync
}

// Record notes the outcome of one sync.
func (r *SyncRecorder) Record(err error) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.s.LastFailure, r.s.LastError = now, err.Error()
		return
	}
	r.s.LastSync, r.s.LastError = now, ""
}

// Get returns the recorded state.
func (r *SyncRecorder) Get() Sync {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.s
}
