package doctor

import "time"

// NodeReport is what one node's agent finds about one Service: what its
// cache holds, what its kernel holds, and what probes from the node get.
// The agent serves it at GET /debug/service/{namespace}/{name}; the CLI
// interprets it (checks.go). Fields are facts, not verdicts.
type NodeReport struct {
	Node string    `json:"node"`
	Time time.Time `json:"time"`

	// Cache is the Service as this agent's informer cache sees it.
	Cache CacheView `json:"cache"`
	// DNS is the answer for the Service's name from the cluster DNS
	// address, queried on this node.
	DNS *DNSResult `json:"dns,omitempty"`
	// Ports are the Service's rules in the proxy's nftables table, per
	// port and family.
	Ports []PortRules `json:"ports,omitempty"`
	// RulesNote says why Ports is empty when rules were not inspected.
	RulesNote string `json:"rulesNote,omitempty"`
	// Probes are connections from this node to the ClusterIP and to every
	// ready endpoint (TCP ports only). Empty unless asked for.
	Probes []Probe `json:"probes,omitempty"`
	// Routes say how this node reaches each ready endpoint.
	Routes []RouteCheck `json:"routes,omitempty"`
	// Links are the MTUs of the node's underlay, VXLAN and bridge devices.
	Links []Link `json:"links,omitempty"`
	// MTU are path-MTU probes to endpoints on other nodes. Empty unless
	// probes were asked for.
	MTU []MTUProbe `json:"mtu,omitempty"`
	// Errors are inspections that could not run (e.g. nft missing).
	Errors []string `json:"errors,omitempty"`
}

// CacheView is a Service and its endpoints as the agent's cache has them.
type CacheView struct {
	Found      bool       `json:"found"`
	Synced     bool       `json:"synced"`
	ClusterIPs []string   `json:"clusterIPs,omitempty"`
	Endpoints  []Endpoint `json:"endpoints,omitempty"`
}

// Endpoint is one endpoint address of the Service's EndpointSlices.
type Endpoint struct {
	IP    string         `json:"ip"`
	Node  string         `json:"node,omitempty"`
	Pod   string         `json:"pod,omitempty"`
	Ready bool           `json:"ready"`
	Ports map[string]int `json:"ports,omitempty"` // port name -> target port number, per slice
}

// DNSResult is one DNS query.
type DNSResult struct {
	Name    string   `json:"name"`
	Server  string   `json:"server"`
	Rcode   string   `json:"rcode,omitempty"`
	Answers []string `json:"answers,omitempty"` // addresses, or "CNAME target"
	Error   string   `json:"error,omitempty"`
	Millis  float64  `json:"ms"`
}

// PortRules are one Service port's rules in one family.
type PortRules struct {
	Port      string `json:"port"` // name, "" if unnamed
	Protocol  string `json:"protocol"`
	Number    int    `json:"number"`
	ClusterIP string `json:"clusterIP"`
	// Map is the verdict map that holds the ClusterIP, Verdict the
	// element's verdict ("goto service-v4-..."); both empty when the
	// ClusterIP is in neither service-ips nor no-endpoint-services.
	Map     string `json:"map,omitempty"`
	Verdict string `json:"verdict,omitempty"`
	// Chain is the chain the verdict jumps to, ChainFound whether it is
	// in the table, Endpoints the DNAT targets it holds ("ip:port").
	Chain      string   `json:"chain,omitempty"`
	ChainFound bool     `json:"chainFound,omitempty"`
	Endpoints  []string `json:"endpoints,omitempty"`
	Local      bool     `json:"local,omitempty"` // answered on the node itself (cluster DNS)
}

// Probe is one TCP connection attempt from the node.
type Probe struct {
	Kind     string  `json:"kind"` // "clusterIP" or "endpoint"
	Target   string  `json:"target"`
	Port     string  `json:"port"` // the Service port's name
	Pod      string  `json:"pod,omitempty"`
	Node     string  `json:"node,omitempty"` // the endpoint's node
	OK       bool    `json:"ok"`
	Refused  bool    `json:"refused,omitempty"`
	Timeout  bool    `json:"timeout,omitempty"`
	Error    string  `json:"error,omitempty"`
	Millis   float64 `json:"ms"`
	Protocol string  `json:"protocol"`
}

// RouteCheck is how the node routes to one endpoint address.
type RouteCheck struct {
	IP   string `json:"ip"`
	Node string `json:"node,omitempty"` // the endpoint's node
	// Local: the endpoint is on this node (reached through the bridge).
	Local bool `json:"local,omitempty"`
	// Knit: a knit route (proto 75) covers the address.
	Knit    bool   `json:"knit"`
	Dst     string `json:"dst,omitempty"`
	Dev     string `json:"dev,omitempty"`
	Gateway string `json:"gateway,omitempty"`
	// Neigh and FDB: for a VXLAN route, whether the permanent neighbour
	// entry for the gateway and the FDB entry for its MAC exist.
	Neigh  *bool  `json:"neigh,omitempty"`
	FDB    *bool  `json:"fdb,omitempty"`
	Actual string `json:"actual,omitempty"` // where the kernel sends it ("via 198.18.0.254 dev eth0")
	// Shadowed: a knit route covers the address, but the kernel sends it
	// elsewhere (a more specific route or a policy rule wins).
	Shadowed bool   `json:"shadowed,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Link is one network device's MTU.
type Link struct {
	Name string `json:"name"`
	Role string `json:"role"` // underlay, vxlan, bridge
	MTU  int    `json:"mtu"`
}

// MTUProbe sends one small and one full-size datagram, with Don't
// Fragment, to a remote endpoint's closed port: an ICMP port unreachable
// (or any answer) proves the datagram arrived.
type MTUProbe struct {
	Target  string `json:"target"`
	Node    string `json:"node,omitempty"`
	Size    int    `json:"size"` // the IP packet size of the big probe
	SmallOK bool   `json:"smallOK"`
	BigOK   bool   `json:"bigOK"`
	Error   string `json:"error,omitempty"`
}

// Role names of Link.
const (
	RoleUnderlay = "underlay"
	RoleVXLAN    = "vxlan"
	RoleBridge   = "bridge"
)
