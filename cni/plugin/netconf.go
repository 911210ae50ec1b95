package plugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/utils"

	"knit.dev/knit/cni/ipam"
)

// Default locations, shared by the agent (which writes them) and the plugin
// (which reads them). A conflist may override RunDir and StateDir so that
// several simulated nodes can share one filesystem in the lab.
const (
	DefaultRunDir   = "/run/knit"
	DefaultStateDir = "/var/lib/knit"
	DefaultConfDir  = "/etc/cni/net.d"
	DefaultBinDir   = "/opt/cni/bin"
	DefaultBridge   = "cni0"
	DefaultMTU      = 1500

	// NetworkName is the network name of the conflist the agent writes.
	NetworkName = "knit"
	// PluginType is the plugin binary name ("type" in the conflist).
	PluginType = "knit"
	// ConfListName is the file the agent writes into the CNI config dir.
	ConfListName = "10-knit.conflist"
	// ConfListVersion is the cniVersion of the conflist the agent writes.
	ConfListVersion = "1.1.0"
)

// NodeConfigPath is where the agent writes the node's network settings.
func NodeConfigPath(runDir string) string { return filepath.Join(runDir, "cni", "node.json") }

// IPAMDir is the directory of the IPAM store under a state dir.
func IPAMDir(stateDir string) string { return filepath.Join(stateDir, "ipam") }

// NodeConfig is the contract between agent and plugin: everything the
// plugin needs to know about the node, written by the agent to
// <RunDir>/cni/node.json once the node's podCIDR is known and its bridge is
// ready. It lives under /run so that a reboot removes it: until the agent
// has prepared the rebooted node, STATUS says not ready and ADD asks the
// runtime to try again later.
type NodeConfig struct {
	PodCIDRs     []netip.Prefix `json:"podCIDRs"`
	MTU          int            `json:"mtu"`
	Bridge       string         `json:"bridge"`
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs,omitempty"`
	ServiceCIDRs []netip.Prefix `json:"serviceCIDRs,omitempty"`
	Hairpin      bool           `json:"hairpin"`
}

// Validate checks what the plugin relies on: one or two podCIDRs (at most one
// per family), a usable MTU and a bridge name.
func (n *NodeConfig) Validate() error {
	if len(n.PodCIDRs) == 0 {
		return errors.New("podCIDRs: empty (the node has no podCIDR yet)")
	}
	if len(n.PodCIDRs) > 2 {
		return fmt.Errorf("podCIDRs: %d prefixes, want one per IP family", len(n.PodCIDRs))
	}
	var v4, v6 int
	for i, p := range n.PodCIDRs {
		if err := ipam.ValidatePool(p); err != nil {
			return fmt.Errorf("podCIDRs[%d]: %v", i, err)
		}
		if p.Addr().Is4() {
			v4++
		} else {
			v6++
		}
	}
	if v4 > 1 || v6 > 1 {
		return errors.New("podCIDRs: two prefixes of the same IP family")
	}
	minMTU := 576
	if v6 > 0 {
		minMTU = 1280
	}
	if n.MTU < minMTU || n.MTU > 65535 {
		return fmt.Errorf("mtu: %d out of range %d-65535", n.MTU, minMTU)
	}
	if err := utils.ValidateInterfaceName(n.Bridge); err != nil {
		return fmt.Errorf("bridge: %q: %s", n.Bridge, err.Msg)
	}
	return nil
}

// errNodeNotReady marks a missing node.json (the agent has not prepared the
// node yet).
var errNodeNotReady = errors.New("node network config not written yet")

// ReadNodeConfig reads and validates <runDir>/cni/node.json.
func ReadNodeConfig(runDir string) (*NodeConfig, error) {
	path := NodeConfigPath(runDir)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s does not exist (the knit agent has not seen this node's podCIDR yet, or is not running)", errNodeNotReady, path)
	}
	if err != nil {
		return nil, fmt.Errorf("read node network config: %w", err)
	}
	return ParseNodeConfig(data, path)
}

// ParseNodeConfig parses and validates a node.json document; name is used in
// error messages.
func ParseNodeConfig(data []byte, name string) (*NodeConfig, error) {
	n := &NodeConfig{}
	if err := json.Unmarshal(data, n); err != nil {
		return nil, fmt.Errorf("node network config %s: %v", name, err)
	}
	if err := n.Validate(); err != nil {
		return nil, fmt.Errorf("node network config %s: %v", name, err)
	}
	return n, nil
}

// NetConf is the plugin's configuration as the runtime passes it on stdin:
// one entry of the conflist plus what the runtime injects (runtimeConfig,
// prevResult, cni.dev/valid-attachments).
type NetConf struct {
	types.PluginConf

	// RunDir and StateDir override DefaultRunDir and DefaultStateDir.
	RunDir   string `json:"runDir,omitempty"`
	StateDir string `json:"stateDir,omitempty"`

	RuntimeConfig struct {
		PortMappings []PortMapEntry `json:"portMappings,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// PortMapEntry is one element of runtimeConfig.portMappings (the CNI
// portMappings capability, as kubelet/containerd pass hostPorts).
type PortMapEntry struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// parseNetConf decodes and validates the stdin configuration. Errors are CNI
// error objects whose message names the offending field.
func parseNetConf(data []byte) (*NetConf, *types.Error) {
	c := &NetConf{}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "invalid network configuration JSON on stdin", err.Error())
	}
	if c.Name == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "name: missing network name", "")
	}
	if err := utils.ValidateNetworkName(c.Name); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("name: invalid network name %q", c.Name), err.Details)
	}
	if c.IPAM.Type != "" {
		return nil, types.NewError(types.ErrUnsupportedField, fmt.Sprintf("ipam: type %q: knit allocates addresses itself, remove the ipam section", c.IPAM.Type), "")
	}
	for _, d := range []struct{ field, path string }{{"runDir", c.RunDir}, {"stateDir", c.StateDir}} {
		if d.path != "" && !filepath.IsAbs(d.path) {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("%s: %q is not an absolute path", d.field, d.path), "")
		}
	}
	if _, err := portMappings(c.RuntimeConfig.PortMappings); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	return c, nil
}

// portMappings validates runtimeConfig.portMappings and converts them to
// what the IPAM store keeps. Duplicates (same host IP, port and protocol)
// are an error: only one pod port can answer.
func portMappings(in []PortMapEntry) ([]ipam.PortMapping, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]ipam.PortMapping, 0, len(in))
	type key struct {
		ip    netip.Addr
		port  uint16
		proto string
	}
	seen := make(map[key]bool, len(in))
	for i, e := range in {
		field := fmt.Sprintf("runtimeConfig.portMappings[%d]", i)
		if e.HostPort < 1 || e.HostPort > 65535 {
			return nil, fmt.Errorf("%s.hostPort: %d out of range 1-65535", field, e.HostPort)
		}
		if e.ContainerPort < 1 || e.ContainerPort > 65535 {
			return nil, fmt.Errorf("%s.containerPort: %d out of range 1-65535", field, e.ContainerPort)
		}
		proto := strings.ToLower(e.Protocol)
		if proto == "" {
			proto = "tcp"
		}
		switch proto {
		case "tcp", "udp", "sctp":
		default:
			return nil, fmt.Errorf("%s.protocol: %q, want tcp, udp or sctp", field, e.Protocol)
		}
		pm := ipam.PortMapping{HostPort: uint16(e.HostPort), ContainerPort: uint16(e.ContainerPort), Protocol: proto}
		if e.HostIP != "" {
			ip, err := netip.ParseAddr(e.HostIP)
			if err != nil || ip.Zone() != "" {
				return nil, fmt.Errorf("%s.hostIP: %q is not an IP address", field, e.HostIP)
			}
			if !ip.IsUnspecified() {
				pm.HostIP = ip.Unmap()
			}
		}
		k := key{pm.HostIP, pm.HostPort, pm.Protocol}
		if seen[k] {
			return nil, fmt.Errorf("%s: hostPort %d/%s mapped twice", field, pm.HostPort, pm.Protocol)
		}
		seen[k] = true
		out = append(out, pm)
	}
	return out, nil
}

// podArgs extracts the Kubernetes pod identity from CNI_ARGS
// ("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=n;K8S_POD_UID=u;IgnoreUnknown=1").
// Unknown keys are ignored: runtimes pass more than any one plugin reads.
func podArgs(s string) (ipam.PodRef, error) {
	var p ipam.PodRef
	if s == "" {
		return p, nil
	}
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return p, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", kv)
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		}
	}
	return p, nil
}
