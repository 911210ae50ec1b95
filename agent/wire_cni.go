package agent

import (
	"knit.dev/knit/cni/node"
)

func buildCNI(a *Agent) (Component, error) {
	cfg := node.Config{
		NodeName:     a.cfg.NodeName,
		RunDir:       a.cfg.RunDir,
		StateDir:     a.cfg.StateDir,
		ConfDir:      a.cfg.CNIConfDir,
		BinDir:       a.cfg.CNIBinDir,
		BinaryPath:   a.cfg.BinaryPath,
		ClusterCIDRs: a.cfg.ClusterCIDRs,
		ServiceCIDRs: a.cfg.ServiceCIDRs,
	}
	if a.overlay != nil {
		// The pod MTU is the overlay's: the underlay's less the VXLAN
		// header. Until the overlay knows it, the CNI config is not written.
		cfg.MTU = a.overlay.MTU
	}
	return node.New(cfg, node.Sources{Nodes: a.cache.Nodes(), Pods: a.cache.Pods()}, a.reg, a.log.With("component", "cni"))
}
