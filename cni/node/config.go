package node

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/utils"
	coreinformers "k8s.io/client-go/informers/core/v1"

	"knit.dev/knit/cni/plugin"
)

// Sources are the informers the node setup reads: this node's Node object
// (its podCIDRs) and the Pods (to find IP reservations whose pod is gone).
type Sources struct {
	Nodes coreinformers.NodeInformer
	// Pods may be nil: reservations are then only released by the
	// runtime's DEL and GC.
	Pods coreinformers.PodInformer
}

// InstallMode says how the knit binary gets into the CNI bin dir.
type InstallMode string

const (
	// InstallCopy copies the binary (temporary file + rename, so a runtime
	// executing the old one is never disturbed) when its size or
	// modification time differs from the installed copy. Works across file
	// systems, e.g. from a container image into a host directory.
	InstallCopy InstallMode = "copy"
	// InstallHardlink hard-links the binary, and copies when the two paths
	// are on different file systems.
	InstallHardlink InstallMode = "hardlink"
	// InstallSymlink points <BinDir>/knit at BinaryPath. Only right when
	// the runtime sees BinaryPath under the same path (not for a binary
	// inside the agent's container image).
	InstallSymlink InstallMode = "symlink"
)

// Defaults for zero Config fields.
const (
	DefaultSyncPeriod      = time.Minute
	DefaultReconcilePeriod = time.Minute
	// DefaultReleaseGrace is how old a reservation must be before the
	// reconciliation may release it: a pod the runtime is setting up right
	// now may not be in the informer cache yet.
	DefaultReleaseGrace = 2 * time.Minute
)

// Config holds the node setup's settings. Zero fields take the defaults
// documented on each; NodeName is required.
type Config struct {
	// NodeName is this node's Node object name. Required.
	NodeName string

	// RunDir holds node.json for the plugin (default /run/knit; cleared by
	// a reboot, on purpose: see plugin.NodeConfig).
	RunDir string
	// StateDir holds the IPAM store, <StateDir>/ipam (default
	// /var/lib/knit). Both are written into the conflist, so the plugin
	// finds them when they are not the defaults.
	StateDir string
	// ConfDir is the CNI configuration directory (default /etc/cni/net.d).
	ConfDir string
	// BinDir is the CNI plugin directory (default /opt/cni/bin).
	BinDir string
	// BinaryPath is the binary to install as <BinDir>/knit: the running
	// knit binary, or the plugin-only knit-cni. Empty: install nothing
	// (something else puts the plugin there).
	BinaryPath string
	// Install is how BinaryPath is installed (default InstallCopy).
	Install InstallMode

	// ClusterCIDRs and ServiceCIDRs go into node.json. A bridge address
	// that is the gateway of a prefix inside ClusterCIDRs but not of a
	// current podCIDR is removed (the node's podCIDR changed).
	ClusterCIDRs, ServiceCIDRs []netip.Prefix

	// MTU returns the MTU pods must use (the overlay's). 0 means not known
	// yet: the node is then not ready and no file is written. Nil: the MTU
	// of the interface of the default route, or 1500 without one.
	MTU func() int
	// Bridge is the node bridge (default "cni0").
	Bridge string
	// ConfName is the conflist's file name in ConfDir (default
	// "10-knit.conflist"). It should sort before any other conflist there:
	// runtimes use the first one.
	ConfName string

	// SyncPeriod is the interval of full resyncs (default 1m).
	SyncPeriod time.Duration
	// ReconcilePeriod is how often IPAM reservations are checked against
	// the Pods of this node (default 1m).
	ReconcilePeriod time.Duration
	// ReleaseGrace is the minimum age of a reservation the reconciliation
	// releases (default 2m).
	ReleaseGrace time.Duration
}

// DefaultConfig returns the defaults; set NodeName, the CIDRs and
// BinaryPath.
func DefaultConfig() Config {
	return Config{
		RunDir:          plugin.DefaultRunDir,
		StateDir:        plugin.DefaultStateDir,
		ConfDir:         plugin.DefaultConfDir,
		BinDir:          plugin.DefaultBinDir,
		Install:         InstallCopy,
		Bridge:          plugin.DefaultBridge,
		ConfName:        plugin.ConfListName,
		SyncPeriod:      DefaultSyncPeriod,
		ReconcilePeriod: DefaultReconcilePeriod,
		ReleaseGrace:    DefaultReleaseGrace,
	}
}

// normalize fills defaults and validates.
func (c Config) normalize() (Config, error) {
	d := DefaultConfig()
	if c.NodeName == "" {
		return c, errors.New("node name is required")
	}
	for _, f := range []struct {
		p   *string
		def string
	}{{&c.RunDir, d.RunDir}, {&c.StateDir, d.StateDir}, {&c.ConfDir, d.ConfDir}, {&c.BinDir, d.BinDir},
		{&c.Bridge, d.Bridge}, {&c.ConfName, d.ConfName}} {
		if *f.p == "" {
			*f.p = f.def
		}
	}
	for _, p := range []struct{ name, path string }{{"RunDir", c.RunDir}, {"StateDir", c.StateDir},
		{"ConfDir", c.ConfDir}, {"BinDir", c.BinDir}} {
		if !filepath.IsAbs(p.path) {
			// The conflist carries runDir and stateDir to the plugin, which
			// the runtime starts in a working directory of its own.
			return c, fmt.Errorf("%s: %q is not an absolute path", p.name, p.path)
		}
	}
	if c.BinaryPath != "" && !filepath.IsAbs(c.BinaryPath) {
		return c, fmt.Errorf("BinaryPath: %q is not an absolute path", c.BinaryPath)
	}
	switch c.Install {
	case "":
		c.Install = InstallCopy
	case InstallCopy, InstallHardlink, InstallSymlink:
	default:
		return c, fmt.Errorf("Install: unknown mode %q (copy, hardlink, symlink)", c.Install)
	}
	if err := utils.ValidateInterfaceName(c.Bridge); err != nil {
		return c, fmt.Errorf("Bridge: %q: %s", c.Bridge, err.Msg)
	}
	if strings.ContainsRune(c.ConfName, filepath.Separator) || !strings.HasSuffix(c.ConfName, ".conflist") {
		return c, fmt.Errorf("ConfName: %q must be a file name ending in .conflist", c.ConfName)
	}
	for _, p := range append(append([]netip.Prefix{}, c.ClusterCIDRs...), c.ServiceCIDRs...) {
		if !p.IsValid() {
			return c, fmt.Errorf("invalid CIDR %v", p)
		}
	}
	if c.SyncPeriod <= 0 {
		c.SyncPeriod = d.SyncPeriod
	}
	if c.ReconcilePeriod <= 0 {
		c.ReconcilePeriod = d.ReconcilePeriod
	}
	if c.ReleaseGrace <= 0 {
		c.ReleaseGrace = d.ReleaseGrace
	}
	return c, nil
}
