package agent

import (
	"slices"

	corev1 "k8s.io/api/core/v1"

	"knit.dev/knit/dns"
	"knit.dev/knit/ingress"
	"knit.dev/knit/overlay"
	"knit.dev/knit/proxy"
	"knit.dev/knit/proxy/lb"
)

// ComponentConfig holds the per-component settings the command line parses.
// Fields the agent knows itself (node name, CIDRs, node IPs) are filled in
// by the builders below, so a flag cannot disagree with them.
type ComponentConfig struct {
	Overlay overlay.Config
	Proxy   proxy.Config
	LB      lb.Config
	DNS     dns.Config
	Ingress ingress.Config
}

// builder constructs one component from the agent's shared pieces. Each
// builder hands its component only the informers it reads.
type builder struct {
	name  string
	build func(a *Agent) (Component, error)
}

// builders lists every component the agent can run, in start order. The
// overlay comes before cni because the CNI node setup asks it for the MTU.
var builders = []builder{
	{"overlay", buildOverlay},
	{"cni", buildCNI},
	{"proxy", buildProxy},
	{"lb", buildLB},
	{"dns", buildDNS},
	{"ingress", buildIngress},
}

func buildOverlay(a *Agent) (Component, error) {
	cfg := a.cfg.Component.Overlay
	cfg.NodeName = a.cfg.NodeName
	cfg.ClusterCIDRs = a.cfg.ClusterCIDRs
	if a.cfg.Enabled["proxy"] {
		// The FORWARD accept rules also let the proxy's marked Service
		// traffic through, as kube-proxy's KUBE-FORWARD does.
		cfg.ForwardMark = a.cfg.Component.Proxy.MasqueradeMark
		if cfg.ForwardMark == 0 {
			cfg.ForwardMark = proxy.DefaultConfig().MasqueradeMark
		}
	}
	// NodeIP stays unset unless --node-ip gave exactly one address: the
	// overlay then takes the Node's InternalIPs itself, one VXLAN device
	// per underlay family on a dual-stack underlay.
	if !cfg.NodeIP.IsValid() && len(a.cfg.NodeIPs) == 1 {
		cfg.NodeIP = a.cfg.NodeIPs[0]
	}
	o, err := overlay.New(cfg, overlay.Sources{Nodes: a.cache.Nodes(), Client: a.conn.Client}, a.reg, a.log.With("component", "overlay"))
	if err != nil {
		return nil, err
	}
	a.overlay = o
	return o, nil
}

func buildProxy(a *Agent) (Component, error) {
	cfg := a.cfg.Component.Proxy
	cfg.NodeName = a.cfg.NodeName
	cfg.NodeIPs = a.nodeIPs
	cfg.ClusterCIDRs = a.cfg.ClusterCIDRs
	cfg.ServiceCIDRs = a.cfg.ServiceCIDRs
	if a.cfg.Enabled["dns"] {
		// The DNS component answers the cluster DNS IP on this node; the
		// proxy must not DNAT it away (see package dns).
		cfg.LocalServiceIPs = a.cfg.ClusterDNS
	}
	return proxy.New(cfg, proxy.Sources{
		Services:       a.cache.Services(),
		EndpointSlices: a.cache.EndpointSlices(),
		Nodes:          a.cache.Nodes(),
	}, a.reg, a.log.With("component", "proxy"))
}

func buildLB(a *Agent) (Component, error) {
	cfg := a.cfg.Component.LB
	cfg.NodeName = a.cfg.NodeName
	if a.cfg.Enabled["overlay"] && a.cfg.Component.Overlay.Port > 0 {
		// A LoadBalancer Service on the VXLAN port would capture the
		// overlay's traffic between nodes.
		p := int32(a.cfg.Component.Overlay.Port)
		cfg.ReservedPorts = append(slices.Clone(cfg.ReservedPorts), lb.PortRange{Protocol: corev1.ProtocolUDP, From: p, To: p})
	}
	return lb.New(cfg, lb.Sources{
		Services:       a.cache.Services(),
		EndpointSlices: a.cache.EndpointSlices(),
		Nodes:          a.cache.Nodes(),
		Client:         a.conn.Client,
	}, a.reg, a.log.With("component", "lb"))
}

func buildDNS(a *Agent) (Component, error) {
	cfg := a.cfg.Component.DNS
	cfg.ClusterDomain = a.cfg.ClusterDomain
	cfg.ServiceCIDRs = a.cfg.ServiceCIDRs
	cfg.ClusterCIDRs = a.cfg.ClusterCIDRs
	if len(cfg.LocalIPs) == 0 {
		cfg.LocalIPs = a.cfg.ClusterDNS
	}
	return dns.New(cfg, dns.Sources{
		Services:       a.cache.Services(),
		EndpointSlices: a.cache.EndpointSlices(),
		Pods:           a.cache.Pods(),
	}, a.reg, a.log.With("component", "dns"))
}

func buildIngress(a *Agent) (Component, error) {
	cfg := a.cfg.Component.Ingress
	cfg.NodeName = a.cfg.NodeName
	if len(cfg.NodeIPs) == 0 {
		cfg.NodeIPs = a.nodeIPs
	}
	return ingress.New(cfg, ingress.Sources{
		Ingresses:      a.cache.Ingresses(),
		IngressClasses: a.cache.IngressClasses(),
		Services:       a.cache.Services(),
		EndpointSlices: a.cache.EndpointSlices(),
		Secrets:        a.cache.TLSSecrets(),
		Client:         a.conn.Client,
		Nodes:          a.cache.Nodes(),
	}, a.reg, a.log.With("component", "ingress"))
}
