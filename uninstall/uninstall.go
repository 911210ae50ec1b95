// Package uninstall owns the list of what knit leaves on a node, and removes
// it: `knit uninstall` after the DaemonSet is gone, or before installing
// another network. It removes knit's things and only those, each found by a
// mark knit alone uses:
//
//	what                                     knit's because
//	nftables tables inet knit-proxy,         their names (proxy, overlay,
//	  knit-overlay, knit-hostport,           cni/hostport, ingress each
//	  knit-ingress, knit-dns                 own one)
//	iptables chain filter KNIT-FORWARD and   its name and the jump's comment
//	  its jump from FORWARD, in each         (overlay's FORWARD accept rules)
//	  installed variant and family
//	iptables chains KNIT-* (but              their names and the jumps'
//	  KNIT-FORWARD) in mangle, filter and    comments (the service proxy's
//	  nat, with their jumps                  iptables backend: proxy)
//	routes in the main table with proto 75   the overlay tags every route it
//	                                         installs with protocol 75
//	links knit-vx4, knit-vx6 (vxlan)         name and type (overlay)
//	link knit-dns0 (dummy)                   name and type (dns/localaddr)
//	the cluster DNS IP(s) on lo, as /32      dns/localaddr puts them there
//	  or /128                                when the kernel has no dummy
//	                                         driver
//	the CNI bridge (cni0)                    see bridgeOwned: only when
//	                                         knit's CNI config names it and
//	                                         no other CNI config does
//	<conf dir>/10-knit.conflist, <bin dir>/  file names knit writes (also
//	  knit and its knit-* symlinks, <run      their ".<name>.knit-tmp"
//	  dir>/cni/node.json                     temporaries)
//
// Left alone on purpose: pods' host veths (the container runtime deletes
// them with the pods; deleting cni0 detaches any that remain), the IPAM
// reservations under the state dir (a reinstall picks them up), sysctls
// (ip_forward and friends: other software may rely on them), and
// annotations on the Node object (uninstall is node-local and needs no API
// access).
//
// Data flow: Plan inspects the node (netlink, nft, the file system) and
// returns Steps, one per object found; nothing is changed. Apply runs the
// steps in order (firewall tables and chains, routes, links, addresses, files) and
// goes on after a failure, returning every error. A step whose object is
// already gone counts as done, so Uninstall can run twice.
//
// Everything happens in the calling thread's network namespace.
package uninstall

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/cni/hostport"
	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/dns"
	"knit.dev/knit/internal/atomicfile"
)

// Names that the owning packages keep unexported; a test checks them
// against those packages' sources.
const (
	// RouteProtocol is overlay.routeProtocol.
	RouteProtocol = 75
	// ProxyTable is proxy.tableName; OverlayTable is overlay.nftTable.
	ProxyTable   = "knit-proxy"
	OverlayTable = "knit-overlay"
	// IngressTable is ingress.guardTable (the restart guard).
	IngressTable = "knit-ingress"
	// DNSTable is dns.guardTable (the DNS restart guard).
	DNSTable = "knit-dns"
	// VXLANv4 and VXLANv6 are overlay.deviceV4 and deviceV6.
	VXLANv4 = "knit-vx4"
	VXLANv6 = "knit-vx6"

	// bridgeAlias, set as the CNI bridge's interface alias, would mark it
	// as knit's beyond doubt (see bridgeOwned).
	bridgeAlias = "knit"
)

// Tables lists knit's nftables tables (family inet).
var Tables = []string{ProxyTable, OverlayTable, hostport.TableName, IngressTable, DNSTable}

// Config says where knit's files are and which addresses are its.
type Config struct {
	// RunDir, CNIConfDir and CNIBinDir are the agent's --run-dir,
	// --cni-conf-dir and --cni-bin-dir (defaults /run/knit,
	// /etc/cni/net.d, /opt/cni/bin). A run dir named in knit's conflist
	// is taken too.
	RunDir, CNIConfDir, CNIBinDir string
	// ClusterDNS are the agent's --cluster-dns IPs: removed from lo.
	ClusterDNS []netip.Addr
	// Symlinks are the names of the knit-* links to the binary in
	// CNIBinDir; only symbolic links are removed.
	Symlinks []string
}

// DefaultConfig has the agent's defaults.
func DefaultConfig() Config {
	return Config{
		RunDir:     plugin.DefaultRunDir,
		CNIConfDir: plugin.DefaultConfDir,
		CNIBinDir:  plugin.DefaultBinDir,
		ClusterDNS: []netip.Addr{netip.MustParseAddr("10.43.0.10")},
	}
}

// Step is one thing to remove.
type Step struct {
	// What says what is removed, for the operator.
	What  string
	apply func() error
}

func (s Step) String() string { return s.What }

// Plan finds what knit left on this node. It changes nothing.
func Plan(ctx context.Context, cfg Config) ([]Step, error) {
	var steps []Step
	var errs []error
	add := func(s []Step, err error) {
		steps = append(steps, s...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	add(planTables(ctx))
	add(planIPTables(ctx))
	add(planRoutes())
	add(planLinks(cfg))
	add(planLoopback(cfg.ClusterDNS))
	add(planFiles(cfg))
	return steps, errors.Join(errs...)
}

// Apply runs every step, in order, and returns all errors.
func Apply(steps []Step) error {
	var errs []error
	for _, s := range steps {
		if err := s.apply(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.What, err))
		}
	}
	return errors.Join(errs...)
}

func planTables(ctx context.Context) ([]Step, error) {
	var steps []Step
	for _, name := range Tables {
		nft, err := knftables.New(knftables.InetFamily, name)
		if err != nil {
			return steps, fmt.Errorf("nftables: %w", err)
		}
		if _, err := nft.List(ctx, "chains"); knftables.IsNotFound(err) {
			continue
		} else if err != nil {
			return steps, fmt.Errorf("look for table inet %s: %w", name, err)
		}
		steps = append(steps, Step{What: "nftables table inet " + name, apply: func() error {
			// Add, then delete: one transaction that succeeds whether or
			// not the table is still there (kube-proxy's cleanup idiom).
			tx := nft.NewTransaction()
			tx.Add(&knftables.Table{})
			tx.Delete(&knftables.Table{})
			return nft.Run(ctx, tx)
		}})
	}
	return steps, nil
}

func planRoutes() ([]Step, error) {
	routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	var steps []Step
	for _, r := range routes {
		if r.Protocol != RouteProtocol {
			continue // a kernel that ignores the filter
		}
		r := r
		steps = append(steps, Step{What: "route " + describeRoute(r), apply: func() error {
			err := netlink.RouteDel(&r)
			if errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV) {
				return nil // gone with its link, or already deleted
			}
			return err
		}})
	}
	return steps, nil
}

func describeRoute(r netlink.Route) string {
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	s := dst
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
		s += " dev " + l.Attrs().Name
	}
	return s + fmt.Sprintf(" proto %d", r.Protocol)
}

func planLinks(cfg Config) ([]Step, error) {
	var steps []Step
	var errs []error
	for _, l := range []struct{ name, typ string }{{VXLANv4, "vxlan"}, {VXLANv6, "vxlan"}, {dns.LocalLinkName, "dummy"}} {
		link, err := netlinksafe.LinkByName(l.name)
		if isNotFound(err) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("look up %s: %w", l.name, err))
			continue
		}
		if link.Type() != l.typ {
			continue // not knit's: knit's is a l.typ
		}
		steps = append(steps, deleteLink(link, fmt.Sprintf("link %s (%s)", l.name, l.typ)))
	}
	br, why, err := bridgeOwned(cfg)
	if err != nil {
		errs = append(errs, err)
	}
	if br != nil {
		steps = append(steps, deleteLink(br, why))
	}
	return steps, errors.Join(errs...)
}

func deleteLink(link netlink.Link, what string) Step {
	return Step{What: what, apply: func() error {
		err := netlink.LinkDel(link)
		if isNotFound(err) || errors.Is(err, unix.ENODEV) {
			return nil
		}
		return err
	}}
}

// bridgeOwned returns the CNI bridge if it is knit's, with a description.
// Nothing on a plain Linux bridge says who created it, and cni0 is also the
// name flannel and the reference bridge plugin use. So the bridge counts as
// knit's only when knit's CNI config is on the node (node.json names the
// bridge; without node.json, as after a reboot, a knit conflist means the
// default cni0) and no other CNI config in the conf dir names a bridge of
// that name. An interface alias settles it either way: "knit" is knit's,
// any other alias is not.
func bridgeOwned(cfg Config) (netlink.Link, string, error) {
	confPath := filepath.Join(cfg.CNIConfDir, plugin.ConfListName)
	_, confErr := os.Stat(confPath)
	name := ""
	for _, dir := range runDirs(cfg) {
		if n, err := plugin.ReadNodeConfig(dir); err == nil {
			name = n.Bridge
			break
		}
	}
	if name == "" && confErr == nil {
		name = plugin.DefaultBridge
	}
	if name == "" {
		return nil, "", nil // no knit CNI config here: not ours to judge
	}
	link, err := netlinksafe.LinkByName(name)
	if isNotFound(err) {
		return nil, "", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("look up %s: %w", name, err)
	}
	if link.Type() != "bridge" {
		return nil, "", nil
	}
	switch alias := link.Attrs().Alias; {
	case alias == bridgeAlias:
	case alias != "":
		return nil, "", nil
	default:
		others, err := otherConfsNaming(cfg.CNIConfDir, name)
		if err != nil {
			return nil, "", err
		}
		if len(others) > 0 {
			return nil, "", nil
		}
	}
	what := fmt.Sprintf("link %s (bridge)", name)
	if n := countPorts(link); n > 0 {
		what += fmt.Sprintf(", %d pod interface(s) still attached lose their network", n)
	}
	return link, what, nil
}

// otherConfsNaming lists the CNI configs in dir, other than knit's, whose
// plugins name bridge as their "bridge".
func otherConfsNaming(dir, bridge string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read CNI conf dir: %w", err)
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		if n == plugin.ConfListName || e.IsDir() ||
			!(strings.HasSuffix(n, ".conf") || strings.HasSuffix(n, ".conflist") || strings.HasSuffix(n, ".json")) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			continue
		}
		var c struct {
			Bridge  string `json:"bridge"`
			Plugins []struct {
				Bridge string `json:"bridge"`
			} `json:"plugins"`
		}
		if json.Unmarshal(b, &c) != nil {
			// Unreadable: assume it might use the bridge.
			out = append(out, n)
			continue
		}
		uses := c.Bridge == bridge
		for _, p := range c.Plugins {
			uses = uses || p.Bridge == bridge
		}
		if uses {
			out = append(out, n)
		}
	}
	return out, nil
}

func countPorts(br netlink.Link) int {
	links, err := netlinksafe.LinkList()
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			n++
		}
	}
	return n
}

func planLoopback(ips []netip.Addr) ([]Step, error) {
	lo, err := netlinksafe.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("look up lo: %w", err)
	}
	addrs, err := netlinksafe.AddrList(lo, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses of lo: %w", err)
	}
	var steps []Step
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		ones, bits := a.Mask.Size()
		if ones != bits || ip.IsLoopback() || !contains(ips, ip) {
			continue
		}
		a := a
		steps = append(steps, Step{What: fmt.Sprintf("address %s/%d on lo (cluster DNS)", ip, ones), apply: func() error {
			err := netlink.AddrDel(lo, &a)
			if errors.Is(err, unix.EADDRNOTAVAIL) {
				return nil
			}
			return err
		}})
	}
	return steps, nil
}

func planFiles(cfg Config) ([]Step, error) {
	var paths []string
	var errs []error
	for _, dir := range runDirs(cfg) {
		p := plugin.NodeConfigPath(dir)
		paths = append(paths, p, atomicfile.TempName(p))
	}
	conf := filepath.Join(cfg.CNIConfDir, plugin.ConfListName)
	bin := filepath.Join(cfg.CNIBinDir, plugin.PluginType)
	paths = append(paths, conf, atomicfile.TempName(conf), bin, atomicfile.TempName(bin))
	var steps []Step
	seen := map[string]bool{}
	for _, p := range paths {
		if seen[p] {
			continue
		}
		seen[p] = true
		fi, err := os.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if fi.IsDir() {
			continue
		}
		steps = append(steps, removeFile(p))
	}
	for _, name := range cfg.Symlinks {
		p := filepath.Join(cfg.CNIBinDir, name)
		target, err := os.Readlink(p)
		if err != nil {
			continue // missing, or not a symlink: not one of knit's
		}
		if filepath.Base(target) != plugin.PluginType {
			continue
		}
		steps = append(steps, removeFile(p))
	}
	return steps, errors.Join(errs...)
}

func removeFile(p string) Step {
	return Step{What: "file " + p, apply: func() error {
		err := os.Remove(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}}
}

// runDirs is cfg.RunDir and the runDir named in knit's conflist, if any
// and different (the lab, and agents run with --run-dir).
func runDirs(cfg Config) []string {
	dirs := []string{cfg.RunDir}
	b, err := os.ReadFile(filepath.Join(cfg.CNIConfDir, plugin.ConfListName))
	if err != nil {
		return dirs
	}
	var c struct {
		Plugins []struct {
			Type   string `json:"type"`
			RunDir string `json:"runDir"`
		} `json:"plugins"`
	}
	if json.Unmarshal(b, &c) != nil {
		return dirs
	}
	for _, p := range c.Plugins {
		if p.Type == plugin.PluginType && p.RunDir != "" && filepath.Clean(p.RunDir) != filepath.Clean(cfg.RunDir) {
			dirs = append(dirs, p.RunDir)
		}
	}
	sort.Strings(dirs[1:])
	return dirs
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

func contains(ips []netip.Addr, ip netip.Addr) bool {
	for _, x := range ips {
		if x.Unmap() == ip {
			return true
		}
	}
	return false
}
