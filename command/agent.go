package command

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
	"k8s.io/apimachinery/pkg/api/resource"

	"knit.dev/knit/agent"
	"knit.dev/knit/dns"
	"knit.dev/knit/ingress"
	"knit.dev/knit/overlay"
	"knit.dev/knit/proxy"
	"knit.dev/knit/proxy/lb"
	"knit.dev/knit/status"
)

// allComponents is the default --components value, in start order.
const allComponents = "cni,overlay,proxy,dns,ingress"

func agentCommand() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run the node agent (the DaemonSet process)",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "node-name", EnvVars: []string{"NODE_NAME"}, Usage: "this node's Node object name"},
			&cli.StringFlag{Name: "kubeconfig", EnvVars: []string{"KUBECONFIG"}, Usage: "kubeconfig path; empty means in-cluster"},
			&cli.StringFlag{Name: "components", Value: allComponents, Usage: "components to run (comma-separated)"},
			&cli.StringFlag{Name: "cluster-cidr", Value: "10.42.0.0/16", Usage: "pod network CIDR(s), comma-separated"},
			&cli.StringFlag{Name: "service-cidr", Value: "10.43.0.0/16", Usage: "Service CIDR(s), comma-separated"},
			&cli.StringFlag{Name: "cluster-dns", Value: "10.43.0.10", Usage: "cluster DNS Service IP(s), answered on every node"},
			&cli.StringFlag{Name: "cluster-domain", Value: "cluster.local"},
			&cli.StringFlag{Name: "health-addr", Value: "127.0.0.1:9940", Usage: "address for /healthz, /readyz and /metrics"},
			&cli.BoolFlag{Name: "pprof", Usage: "also serve Go profiles (net/http/pprof) under /debug/pprof/ on --health-addr"},
			&cli.IntFlag{Name: "gc-percent", Usage: "Go collector's GOGC; 0: GOGC if set, else 25"},
			&cli.StringFlag{Name: "memory-limit", Value: "0", Usage: "Go runtime soft memory limit (e.g. 100Mi); 0: GOMEMLIMIT if set, else none"},
			&cli.BoolFlag{Name: "release-startup-pages", Value: true, Usage: "once Ready, unmap the binary's pages touched only at start-up (see docs/benchmarks.md, Memory)"},
			&cli.StringFlag{Name: "state-dir", Value: "/var/lib/knit", Usage: "persistent state (IPAM reservations)"},
			&cli.StringFlag{Name: "run-dir", Value: "/run/knit", Usage: "runtime state (node network config for the CNI plugin)"},
			&cli.StringFlag{Name: "cni-conf-dir", Value: "/etc/cni/net.d"},
			&cli.StringFlag{Name: "cni-bin-dir", Value: "/opt/cni/bin"},
			&cli.StringFlag{Name: "cni-plugin-binary", Usage: "binary to install as <cni-bin-dir>/knit; default: knit-cni beside this binary, else this binary"},
			&cli.StringFlag{Name: "node-ip", Usage: "this node's IP(s); default: the Node object's InternalIPs"},
			&cli.StringFlag{Name: "overlay-backend", Value: "vxlan", Usage: "vxlan, direct (one L2 segment) or auto (direct where possible)"},
			&cli.IntFlag{Name: "vxlan-vni", Value: 1},
			&cli.IntFlag{Name: "vxlan-port", Value: 8472},
			&cli.BoolFlag{Name: "masquerade", Value: true, Usage: "masquerade pod traffic leaving the cluster CIDR"},
			&cli.BoolFlag{Name: "overlay-forward-rules", Value: true, Usage: "accept traffic from and to the cluster CIDR in the iptables FORWARD chain (chain KNIT-FORWARD), so a FORWARD policy of DROP (Docker's) does not cut pods off"},
			&cli.StringFlag{Name: "proxy-backend", Value: "auto", Usage: "nftables, iptables (iptables-legacy, iptables-nft to force the variant) or auto (nftables if usable, else iptables)"},
			&cli.StringFlag{Name: "lb-class", Value: lb.DefaultClass, Usage: "loadBalancerClass of the Services knit's load balancer serves (it runs with the proxy component); empty turns it off"},
			&cli.BoolFlag{Name: "lb-default-class", Usage: "the load balancer also serves LoadBalancer Services with no loadBalancerClass"},
			&cli.IntFlag{Name: "lb-max-nodes", Value: lb.DefaultMaxNodes, Usage: "most nodes listed as one LoadBalancer Service's addresses; 0 lists every eligible node"},
			&cli.StringFlag{Name: "lb-reserved-ports", Value: lb.FormatPortRanges(lb.DefaultReservedPorts()), Usage: "node ports no LoadBalancer Service may take (PORT[-PORT]/PROTO, comma-separated); the VXLAN port is added"},
			&cli.StringFlag{Name: "dns-upstream", Usage: "upstream resolvers (comma-separated host:port); default: the node's resolv.conf"},
			&cli.StringFlag{Name: "dns-resolv-conf", Value: "/etc/resolv.conf", Usage: "resolv.conf to take upstreams from"},
			&cli.StringFlag{Name: "ingress-http-addr", Value: ":80"},
			&cli.StringFlag{Name: "ingress-https-addr", Value: ":443"},
			&cli.StringFlag{Name: "ingress-controller", Value: "knit.dev/ingress", Usage: "IngressClass controller name knit serves"},
			&cli.BoolFlag{Name: "ingress-access-log", Usage: "log every proxied request"},
			&cli.StringFlag{Name: "status-namespace", Value: status.DefaultNamespace, EnvVars: []string{"POD_NAMESPACE"}, Usage: "namespace of this node's status Lease (knit status); empty: do not publish"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
		},
		Action: func(c *cli.Context) error {
			log, err := newLogger(c.App.ErrWriter, c.String("log-format"), c.String("log-level"))
			if err != nil {
				return err
			}
			cfg, err := agentConfig(c)
			if err != nil {
				return err
			}
			a, err := agent.New(cfg, log)
			if err != nil {
				return err
			}
			ctx, stop := signalContext(c.Context)
			defer stop()
			return a.Run(ctx)
		},
	}
}

func agentConfig(c *cli.Context) (agent.Config, error) {
	cfg := agent.Config{
		NodeName:      c.String("node-name"),
		Kubeconfig:    c.String("kubeconfig"),
		ClusterDomain: strings.TrimSuffix(c.String("cluster-domain"), "."),
		HealthAddr:    c.String("health-addr"),
		Profiling:     c.Bool("pprof"),
		StateDir:      c.String("state-dir"),
		RunDir:        c.String("run-dir"),
		CNIConfDir:    c.String("cni-conf-dir"),
		CNIBinDir:     c.String("cni-bin-dir"),
		Enabled:       map[string]bool{},

		Version:         Version,
		StatusNamespace: c.String("status-namespace"),
	}
	var err error
	if cfg.ClusterCIDRs, err = parsePrefixes("cluster-cidr", c.String("cluster-cidr")); err != nil {
		return cfg, err
	}
	if cfg.ServiceCIDRs, err = parsePrefixes("service-cidr", c.String("service-cidr")); err != nil {
		return cfg, err
	}
	if cfg.ClusterDNS, err = parseAddrs("cluster-dns", c.String("cluster-dns")); err != nil {
		return cfg, err
	}
	if cfg.NodeIPs, err = parseAddrs("node-ip", c.String("node-ip")); err != nil {
		return cfg, err
	}
	limit, err := resource.ParseQuantity(c.String("memory-limit"))
	if err != nil || limit.Sign() < 0 {
		return cfg, fmt.Errorf("--memory-limit: want a size such as 40Mi or 0, got %q", c.String("memory-limit"))
	}
	cfg.MemoryLimit = limit.Value()
	if cfg.GCPercent = c.Int("gc-percent"); cfg.GCPercent < 0 {
		return cfg, fmt.Errorf("--gc-percent: want 0 or more, got %d", cfg.GCPercent)
	}
	cfg.ReleaseStartupPages = c.Bool("release-startup-pages")
	comp := &cfg.Component
	comp.Overlay = overlay.DefaultConfig()
	comp.Overlay.Backend = overlay.Backend(c.String("overlay-backend"))
	comp.Overlay.VNI = c.Int("vxlan-vni")
	comp.Overlay.Port = c.Int("vxlan-port")
	comp.Overlay.Masquerade = c.Bool("masquerade")
	comp.Overlay.ForwardRules = c.Bool("overlay-forward-rules")
	comp.Proxy = proxy.DefaultConfig()
	comp.Proxy.Backend = c.String("proxy-backend")
	comp.LB = lb.DefaultConfig()
	comp.LB.Class = c.String("lb-class")
	comp.LB.DefaultClass = c.Bool("lb-default-class")
	comp.LB.MaxNodes = c.Int("lb-max-nodes")
	if comp.LB.ReservedPorts, err = lb.ParsePortRanges(c.String("lb-reserved-ports")); err != nil {
		return cfg, fmt.Errorf("--lb-reserved-ports: %w", err)
	}
	comp.DNS = dns.DefaultConfig()
	comp.DNS.Upstreams = splitList(c.String("dns-upstream"))
	comp.DNS.ResolvConf = c.String("dns-resolv-conf")
	comp.DNS.BindLocalIP = true
	comp.DNS.ListenAddrs = nil
	for _, ip := range cfg.ClusterDNS {
		comp.DNS.ListenAddrs = append(comp.DNS.ListenAddrs, netip.AddrPortFrom(ip, 53))
	}
	comp.Ingress = ingress.DefaultConfig()
	comp.Ingress.HTTPAddr = c.String("ingress-http-addr")
	comp.Ingress.HTTPSAddr = c.String("ingress-https-addr")
	comp.Ingress.ControllerName = c.String("ingress-controller")
	comp.Ingress.AccessLog = c.Bool("ingress-access-log")

	known := map[string]bool{}
	for _, n := range splitList(allComponents) {
		known[n] = true
	}
	for _, n := range splitList(c.String("components")) {
		if !known[n] {
			return cfg, fmt.Errorf("--components: unknown component %q (known: %s)", n, allComponents)
		}
		cfg.Enabled[n] = true
	}
	// The load balancer is part of the service proxy: it only writes
	// Service status, which the proxy turns into rules.
	if cfg.Enabled["proxy"] && comp.LB.Class != "" {
		cfg.Enabled["lb"] = true
	}
	cfg.BinaryPath = c.String("cni-plugin-binary")
	if cfg.BinaryPath == "" {
		cfg.BinaryPath = defaultPluginBinary()
	}
	return cfg, nil
}

func parsePrefixes(flag, s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range splitList(s) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", flag, err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

func parseAddrs(flag, s string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, f := range splitList(s) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", flag, err)
		}
		out = append(out, a)
	}
	return out, nil
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format: want text or json, got %q", format)
}

// signalContext is a context cancelled by SIGTERM or SIGINT.
func signalContext(parent context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(parent, syscall.SIGTERM, syscall.SIGINT)
}

// defaultPluginBinary picks what the agent installs as the CNI plugin. The
// plugin-only build knit-cni (same source, package cni/cmd/knit-cni) starts
// in about 3 ms; this multi-call binary pays ~10 ms of package
// initialisation (client-go and the other components) on every exec, which
// the runtime does twice per pod (docs/benchmarks.md, CNI). The multi-call
// binary still works as the plugin when knit-cni is not shipped.
func defaultPluginBinary() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	if p := filepath.Join(filepath.Dir(exe), "knit-cni"); fileExists(p) {
		return p
	}
	return exe
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
