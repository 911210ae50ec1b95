// Package plugin is knit's CNI plugin: what the container runtime executes
// (as the binary named "knit" in the CNI bin dir) for every pod sandbox.
// It never talks to the API server: it reads the node's settings from the
// file the agent writes (NodeConfig, <runDir>/cni/node.json) and keeps IP
// reservations in the locked on-disk store of package ipam.
//
// ADD, in order (each step undone, in reverse, if a later one fails):
//
//	stdin + CNI_* env --parse/validate--> NetConf, NodeConfig
//	ipam.Store.Update: prune reservations of an earlier boot, Allocate
//	    one address per podCIDR for (CNI_CONTAINERID, CNI_IFNAME)
//	netlink: veth knvXXXXXXXXXXXX (host, up, on bridge, hairpin) <-> CNI_IFNAME
//	    (born in CNI_NETNS); pod addresses (IPv6 without DAD), default routes
//	hostport (only with portMappings): re-render table inet knit-hostport
//	    from the store, one nft transaction, under the store lock
//	result (types/100, converted to the config's cniVersion) -> stdout
//
// DEL, while CNI_NETNS still exists, cuts the host veth off the node in
// one netlink request (down, off the bridge) and leaves the pair for the
// kernel to destroy when the runtime removes the namespace right after
// DEL; without the namespace it deletes the host end, if any is left. It
// then releases the reservation and, if it had hostPorts, re-renders the
// hostport table. Every step tolerates "already gone", so DEL is
// idempotent and finishes half-built pods. GC releases every reservation
// not in cni.dev/valid-attachments, deletes their host veths and sweeps
// detached host veths no reservation claims (SweepHostVeths). STATUS
// reports 50 until node.json exists or when
// a pool is exhausted, 51 when the bridge is gone.
//
// Error codes: the spec's (1 version, 2 unsupported field, 3 unknown
// container, 4 environment, 5 I/O, 6 decoding, 7 config, 11 try again
// later, 50/51 STATUS), libcni's 8 for a bad CNI_NETNS, and knit's own:
// 100 pool exhausted, 101 hostPort conflict, 102 CHECK found a difference,
// 999 any other failure. The message always names the field or condition.
package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/utils"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/cni/hostport"
	"knit.dev/knit/cni/ipam"
)

// knit's plugin-specific error codes (100+ is the plugin's range).
const (
	ErrPoolExhausted    uint = 100
	ErrHostPortConflict uint = 101
	ErrCheckFailed      uint = 102
)

// SupportedVersions are the CNI spec versions the plugin accepts in a
// configuration.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// maxStdin bounds the configuration read from stdin.
const maxStdin = 4 << 20

// Main runs one CNI command: the CNI_* variables come from env, the
// configuration from stdin, the result or error object goes to stdout and
// diagnostics to stderr. It returns the process exit status (0 on success,
// 1 after printing an error object) and never panics. Production calls it
// as Main(os.Stdin, os.Stdout, os.Stderr, os.Getenv); tests call it in
// process with their own env.
func Main(stdin io.Reader, stdout, stderr io.Writer, env func(string) string) int {
	p := &plugin{
		stdout:          stdout,
		stderr:          stderr,
		bootIDPath:      ipam.BootIDPath,
		defaultRunDir:   DefaultRunDir,
		defaultStateDir: DefaultStateDir,
		now:             time.Now,
		newNFT:          hostport.New,
		fault:           testFault,
	}
	return p.main(stdin, env)
}

// testFault, when set (tests only), is called at named points of ADD; an
// error it returns fails the ADD there, and it may block to let a test kill
// the process mid-ADD.
var testFault func(stage string) error

type plugin struct {
	stdout, stderr io.Writer
	bootIDPath     string
	// runDir and stateDir apply when the configuration names none.
	defaultRunDir, defaultStateDir string
	now                            func() time.Time
	newNFT                         func() (knftables.Interface, error)
	fault                          func(stage string) error
}

// cmdArgs are the CNI_* environment variables.
type cmdArgs struct {
	command, containerID, netns, ifName, args string
	netnsOverride                             bool
}

func (p *plugin) main(stdin io.Reader, env func(string) string) (code int) {
	confVersion := version.Current()
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(p.stderr, "knit: panic: %v\n%s", r, debug.Stack())
			p.printError(confVersion, types.NewError(types.ErrInternal, fmt.Sprintf("internal error: %v", r), ""))
			code = 1
		}
	}()
	fail := func(e *types.Error) int {
		fmt.Fprintf(p.stderr, "knit: %s: %s\n", env("CNI_COMMAND"), e.Msg)
		p.printError(confVersion, e)
		return 1
	}

	a, terr := readArgs(env)
	if terr != nil {
		return fail(terr)
	}
	if a.command == "VERSION" {
		if err := version.PluginSupports(SupportedVersions...).Encode(p.stdout); err != nil {
			return fail(types.NewError(types.ErrIOFailure, "write VERSION result: "+err.Error(), ""))
		}
		return 0
	}

	data, err := io.ReadAll(io.LimitReader(stdin, maxStdin+1))
	if err != nil {
		return fail(types.NewError(types.ErrIOFailure, "read network configuration from stdin: "+err.Error(), ""))
	}
	if len(data) > maxStdin {
		return fail(types.NewError(types.ErrIOFailure, fmt.Sprintf("network configuration on stdin larger than %d bytes", maxStdin), ""))
	}
	conf, terr := parseNetConf(data)
	if terr != nil {
		return fail(terr)
	}
	if terr := checkVersion(a.command, conf.CNIVersion); terr != nil {
		return fail(terr)
	}
	confVersion = conf.CNIVersion

	switch a.command {
	case "ADD":
		res, err := p.add(a, conf)
		if err != nil {
			return fail(toCNIError(err))
		}
		out, err := res.GetAsVersion(conf.CNIVersion)
		if err == nil {
			err = out.PrintTo(p.stdout)
		}
		if err != nil {
			// The plumbing is done but the runtime cannot learn of it: undo.
			p.undoAdd(a, conf)
			return fail(types.NewError(types.ErrIOFailure, "write ADD result: "+err.Error(), ""))
		}
	case "DEL":
		err = p.del(a, conf)
	case "CHECK":
		err = p.check(a, conf)
	case "STATUS":
		err = p.status(conf)
	case "GC":
		err = p.gc(conf)
	}
	if err != nil {
		return fail(toCNIError(err))
	}
	return 0
}

// readArgs reads and validates the CNI_* variables the command needs.
func readArgs(env func(string) string) (*cmdArgs, *types.Error) {
	a := &cmdArgs{
		command:     env("CNI_COMMAND"),
		containerID: env("CNI_CONTAINERID"),
		netns:       env("CNI_NETNS"),
		ifName:      env("CNI_IFNAME"),
		args:        env("CNI_ARGS"),
	}
	o := env("CNI_NETNS_OVERRIDE")
	a.netnsOverride = o == "1" || strings.EqualFold(o, "true")

	var need []string
	switch a.command {
	case "ADD", "CHECK":
		need = []string{"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"}
	case "DEL":
		need = []string{"CNI_CONTAINERID", "CNI_IFNAME"}
	case "GC", "STATUS", "VERSION":
	case "":
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_COMMAND: not set", "")
	default:
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_COMMAND: unknown command %q", a.command), "")
	}
	var missing []string
	for _, v := range need {
		if env(v) == "" {
			missing = append(missing, v)
		}
	}
	if len(missing) > 0 {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("%s: required for %s but not set", strings.Join(missing, ", "), a.command), "")
	}
	if len(need) > 0 {
		if e := utils.ValidateContainerID(a.containerID); e != nil {
			return nil, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_CONTAINERID: %s", e.Msg), e.Details)
		}
		if e := utils.ValidateInterfaceName(a.ifName); e != nil {
			return nil, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_IFNAME: %q: %s", a.ifName, e.Msg), e.Details)
		}
	}
	return a, nil
}

// checkVersion checks the configuration's cniVersion against what the plugin
// and the command support.
func checkVersion(cmd, v string) *types.Error {
	if v == "" {
		return types.NewError(types.ErrIncompatibleCNIVersion, "cniVersion: missing from the network configuration", "")
	}
	ok := false
	for _, s := range SupportedVersions {
		ok = ok || s == v
	}
	if !ok {
		return types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf("cniVersion: %q is not supported (supported: %s)", v, strings.Join(SupportedVersions, ", ")), "")
	}
	min := map[string]string{"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}[cmd]
	if min == "" {
		return nil
	}
	if ge, err := version.GreaterThanOrEqualTo(v, min); err != nil || !ge {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("cniVersion: %s needs %s or later, the configuration has %s", cmd, min, v), "")
	}
	return nil
}

// toCNIError maps an error to the CNI error object the runtime sees.
func toCNIError(err error) *types.Error {
	var te *types.Error
	var ex *ipam.ExhaustedError
	var ne *netnsError
	switch {
	case errors.As(err, &te):
		return te
	case errors.Is(err, errNodeNotReady):
		return types.NewError(types.ErrTryAgainLater, err.Error(), "")
	case errors.As(err, &ex):
		return types.NewError(ErrPoolExhausted, err.Error(), "")
	case errors.As(err, &ne):
		return types.NewError(types.ErrInvalidNetNS, err.Error(), "")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}

// printError writes a spec error object (with cniVersion, which
// types.Error.Print leaves out).
func (p *plugin) printError(cniVersion string, e *types.Error) {
	out := struct {
		CNIVersion string `json:"cniVersion"`
		Code       uint   `json:"code"`
		Msg        string `json:"msg"`
		Details    string `json:"details,omitempty"`
	}{cniVersion, e.Code, e.Msg, e.Details}
	b, _ := json.Marshal(out)
	p.stdout.Write(append(b, '\n'))
}

func (p *plugin) bootID() string {
	b, err := os.ReadFile(p.bootIDPath)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func (p *plugin) openStore(conf *NetConf) (*ipam.Store, error) {
	s, err := ipam.Open(IPAMDir(p.stateDir(conf)), conf.Name, ipam.Options{Boot: p.bootID()})
	if err != nil {
		return nil, types.NewError(types.ErrIOFailure, err.Error(), "")
	}
	return s, nil
}

func (p *plugin) runDir(conf *NetConf) string {
	if conf.RunDir != "" {
		return conf.RunDir
	}
	return p.defaultRunDir
}

func (p *plugin) stateDir(conf *NetConf) string {
	if conf.StateDir != "" {
		return conf.StateDir
	}
	return p.defaultStateDir
}

func (p *plugin) hook(stage string) error {
	if p.fault == nil {
		return nil
	}
	return p.fault(stage)
}

func (p *plugin) add(a *cmdArgs, conf *NetConf) (_ *current.Result, err error) {
	podNS, err := ns.GetNS(a.netns)
	if err != nil {
		return nil, &netnsError{path: a.netns, err: err}
	}
	defer podNS.Close()
	if !a.netnsOverride && sameNetNS(podNS) {
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("CNI_NETNS: %q is the plugin's own network namespace", a.netns), "")
	}
	node, err := ReadNodeConfig(p.runDir(conf))
	if err != nil {
		return nil, err
	}
	pms, _ := portMappings(conf.RuntimeConfig.PortMappings) // validated by parseNetConf
	pod, err := podArgs(a.args)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	}
	store, err := p.openStore(conf)
	if err != nil {
		return nil, err
	}
	att := ipam.Attachment{ContainerID: a.containerID, IfName: a.ifName}
	req := ipam.Request{Attachment: att, Netns: a.netns, Pod: pod, PortMappings: pms, Now: p.now()}
	var res ipam.Reservation
	err = store.Update(func(st *ipam.State) error {
		r, err := st.Allocate(req, node.PodCIDRs)
		if err != nil {
			return err
		}
		if c := hostport.Conflicts(r, st.Reservations); len(c) > 0 {
			return types.NewError(ErrHostPortConflict, fmt.Sprintf("runtimeConfig.portMappings: hostPort %d/%s is already mapped to %s (container %s)",
				c[0].HostPort, c[0].Protocol, c[0].PodIP, c[0].Owner), "")
		}
		res = r
		return nil
	})
	if err != nil {
		return nil, err
	}

	hostName := HostVethName(a.containerID, a.ifName)
	defer func() {
		if err != nil {
			if rerr := p.rollback(store, att, hostName, len(pms) > 0); rerr != nil {
				fmt.Fprintf(p.stderr, "knit: ADD %s: rollback: %v\n", att, rerr)
			}
		}
	}()
	if err := p.hook("allocated"); err != nil {
		return nil, err
	}
	pl, err := setupPod(node, podNS, a.ifName, hostName, res.IPs)
	if err != nil {
		return nil, err
	}
	if err := p.hook("plumbed"); err != nil {
		return nil, err
	}
	if len(pms) > 0 {
		if err := p.syncHostports(store); err != nil {
			return nil, err
		}
	}
	if err := p.hook("done"); err != nil {
		return nil, err
	}
	return buildResult(node, pl, a.netns, res.IPs, conf.DNS), nil
}

// rollback undoes a failed ADD: host veth (and with it the pod end), the
// reservation, and the hostPorts rendered for it.
func (p *plugin) rollback(store *ipam.Store, att ipam.Attachment, hostName string, hadPorts bool) error {
	var errs []error
	if err := deleteLink(hostName); err != nil {
		errs = append(errs, err)
	}
	err := store.Update(func(st *ipam.State) error {
		st.Release(att)
		if hadPorts {
			return p.renderHostports(st)
		}
		return nil
	})
	return errors.Join(append(errs, err)...)
}

// undoAdd is rollback for an ADD whose result could not be written.
func (p *plugin) undoAdd(a *cmdArgs, conf *NetConf) {
	// Deleted at once, not detached: the runtime may retry ADD into the
	// same namespace, which must not find ifName taken.
	if err := deleteLink(HostVethName(a.containerID, a.ifName)); err != nil {
		fmt.Fprintf(p.stderr, "knit: undo ADD: %v\n", err)
	}
	if err := p.del(a, conf); err != nil {
		fmt.Fprintf(p.stderr, "knit: undo ADD: %v\n", err)
	}
}

// syncHostports re-renders the hostport table from the store, under its
// lock, so that no concurrent ADD/DEL renders from an older state.
func (p *plugin) syncHostports(store *ipam.Store) error {
	return store.Update(func(st *ipam.State) error { return p.renderHostports(st) })
}

// renderHostports applies the hostport table for st's reservations. It is
// called with the store lock held.
func (p *plugin) renderHostports(st *ipam.State) error {
	return renderHostports(st, p.newNFT, func(c hostport.Mapping) {
		fmt.Fprintf(p.stderr, "knit: hostPort %d/%s of %s conflicts with an earlier pod, not mapped\n", c.HostPort, c.Protocol, c.Owner)
	})
}

// renderHostports renders the hostport table from st in one transaction;
// conflict is told about every mapping left out because an earlier pod
// holds its port.
func renderHostports(st *ipam.State, newNFT func() (knftables.Interface, error), conflict func(hostport.Mapping)) error {
	ms, conflicts := hostport.FromReservations(st.Reservations)
	if conflict != nil {
		for _, c := range conflicts {
			conflict(c)
		}
	}
	nft, err := newNFT()
	if err != nil {
		return fmt.Errorf("hostPort needs nftables: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return hostport.Sync(ctx, nft, ms)
}

// buildResult is the ADD result: interfaces bridge, host veth, pod
// interface (index 2, the one the IPs belong to), one IP and one default
// route per podCIDR, and the configuration's DNS settings.
func buildResult(node *NodeConfig, pl *podLink, netnsPath string, ips []netip.Addr, dns types.DNS) *current.Result {
	r := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: pl.bridgeName, Mac: pl.bridgeMAC},
			{Name: pl.hostName, Mac: pl.hostMAC},
			{Name: pl.podName, Mac: pl.podMAC, Sandbox: netnsPath},
		},
		DNS: dns,
	}
	for i, ip := range ips {
		pool := node.PodCIDRs[i]
		gw := net.IP(ipam.Gateway(pool).AsSlice())
		r.IPs = append(r.IPs, &current.IPConfig{Interface: current.Int(2), Address: *ipNet(ip, pool), Gateway: gw})
		dst := net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if ip.Is6() {
			dst = net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		r.Routes = append(r.Routes, &types.Route{Dst: dst, GW: gw})
	}
	return r
}

// del cuts the pod off and releases what it held.
//
// Deleting a bridged veth costs ~20 ms: the kernel unregisters both ends
// under RTNL and waits for RCU grace periods before it returns, and every
// parallel DEL (and ADD) on the node queues behind that lock. While the pod
// namespace still exists, the runtime removes it right after DEL, and
// destroying the namespace destroys the pair anyway, in the kernel's
// cleanup work rather than in our request. So DEL only makes the host end
// harmless at once: down and off the bridge (detachLink, one RTM_SETLINK),
// after which no packet reaches the pod's address and it may be released.
// A detached end outlives DEL only if the runtime never removes the
// namespace; GC and the agent's reconciliation delete such leftovers
// (SweepHostVeths). Without the namespace there is no one to free the host
// end, so DEL deletes it; GC and rollbacks delete synchronously too.
func (p *plugin) del(a *cmdArgs, conf *NetConf) error {
	var errs []error
	// The host end first: once it is off the bridge no packet reaches the
	// address, so releasing it cannot hand a live address to the next pod.
	host := HostVethName(a.containerID, a.ifName)
	cut := deleteLink
	if a.netns != "" {
		if podNS, err := ns.GetNS(a.netns); err == nil {
			podNS.Close()
			cut = detachLink
		}
	}
	if err := cut(host); err != nil {
		errs = append(errs, err)
	}
	store, err := p.openStore(conf)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	att := ipam.Attachment{ContainerID: a.containerID, IfName: a.ifName}
	err = store.Update(func(st *ipam.State) error {
		r, ok := st.Release(att)
		if ok && len(r.PortMappings) > 0 {
			return p.renderHostports(st)
		}
		return nil
	})
	return errors.Join(append(errs, err)...)
}

func (p *plugin) status(conf *NetConf) error {
	node, err := ReadNodeConfig(p.runDir(conf))
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	if err := bridgeUp(node.Bridge); err != nil {
		return types.NewError(types.ErrLimitedConnectivity, err.Error(), "")
	}
	store, err := p.openStore(conf)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	st, err := store.View()
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	for _, pool := range node.PodCIDRs {
		used := 0
		for _, r := range st.Reservations {
			for _, ip := range r.IPs {
				if pool.Contains(ip) {
					used++
				}
			}
		}
		if size := ipam.PoolSize(pool); uint64(used) >= size {
			return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("pool %s exhausted: %d of %d addresses reserved", pool, used, size), "")
		}
	}
	return nil
}

func (p *plugin) gc(conf *NetConf) error {
	valid := make(map[ipam.Attachment]bool, len(conf.ValidAttachments))
	for _, v := range conf.ValidAttachments {
		valid[ipam.Attachment{ContainerID: v.ContainerID, IfName: v.IfName}] = true
	}
	store, err := p.openStore(conf)
	if err != nil {
		return err
	}
	released, err := ReleaseWhere(store, p.newNFT, func(r ipam.Reservation) bool { return !valid[r.Attachment] })
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, r := range released {
		if err := deleteLink(HostVethName(r.ContainerID, r.IfName)); err != nil {
			errs = append(errs, err)
		}
	}
	// Host ends DEL detached but no namespace removal freed.
	if st, err := store.View(); err != nil {
		errs = append(errs, err)
	} else if _, err := SweepHostVeths(ReservedHostVeths(st.Reservations)); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("GC: %w", errors.Join(errs...))
	}
	return nil
}

// ReleaseWhere releases, under the store's lock, every reservation drop
// selects, and re-renders the hostPort table (newNFT, usually
// hostport.New) when one of them had hostPorts. If the table cannot be
// updated, the reservations with hostPorts are kept (their addresses must
// not go to a new pod while DNAT still steers traffic to them), the others
// are released and the error is returned. It returns what it released; the
// caller deletes their host veths (HostVethName), as GC does. The agent's
// reconciliation against the API's pods uses it too.
func ReleaseWhere(store *ipam.Store, newNFT func() (knftables.Interface, error), drop func(ipam.Reservation) bool) ([]ipam.Reservation, error) {
	var released []ipam.Reservation
	var renderErr error
	err := store.Update(func(st *ipam.State) error {
		released = st.Retain(func(r ipam.Reservation) bool { return !drop(r) })
		withPorts := false
		for _, r := range released {
			withPorts = withPorts || len(r.PortMappings) > 0
		}
		if !withPorts {
			return nil
		}
		if renderErr = renderHostports(st, newNFT, nil); renderErr != nil {
			kept := released[:0]
			for _, r := range released {
				if len(r.PortMappings) > 0 {
					st.Reservations = append(st.Reservations, r)
				} else {
					kept = append(kept, r)
				}
			}
			released = kept
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return released, renderErr
}

func (p *plugin) check(a *cmdArgs, conf *NetConf) error {
	checkErr := func(format string, args ...any) error {
		return types.NewError(ErrCheckFailed, fmt.Sprintf(format, args...), "")
	}
	node, err := ReadNodeConfig(p.runDir(conf))
	if err != nil {
		return err
	}
	if conf.RawPrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "prevResult: missing (CHECK needs the result of ADD)", "")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	podIdx := -1
	for i, intf := range prev.Interfaces {
		if intf.Name == a.ifName && intf.Sandbox == a.netns {
			podIdx = i
		}
	}
	if podIdx < 0 {
		return checkErr("prevResult: no interface %s with sandbox %s", a.ifName, a.netns)
	}
	var ips []*current.IPConfig
	for _, ipc := range prev.IPs {
		if ipc.Interface != nil && *ipc.Interface == podIdx {
			ips = append(ips, ipc)
		}
	}

	store, err := p.openStore(conf)
	if err != nil {
		return err
	}
	st, err := store.View()
	if err != nil {
		return err
	}
	att := ipam.Attachment{ContainerID: a.containerID, IfName: a.ifName}
	res := st.Find(att)
	if res == nil {
		return checkErr("IPAM: no reservation for container %s interface %s", a.containerID, a.ifName)
	}
	for _, ipc := range ips {
		ip, _ := netip.AddrFromSlice(ipc.Address.IP)
		found := false
		for _, rip := range res.IPs {
			found = found || rip == ip.Unmap()
		}
		if !found {
			return checkErr("IPAM: %s is in prevResult but reserved addresses are %v", ip.Unmap(), res.IPs)
		}
	}
	var mac string
	if prev.Interfaces[podIdx] != nil {
		mac = prev.Interfaces[podIdx].Mac
	}
	if err := checkPod(node, a.netns, a.ifName, HostVethName(a.containerID, a.ifName), mac, ips, prev.Routes); err != nil {
		return checkErr("%v", err)
	}
	if len(res.PortMappings) > 0 {
		ms, _ := hostport.FromReservations([]ipam.Reservation{*res})
		nft, err := p.newNFT()
		if err != nil {
			return checkErr("hostPort: %v", err)
		}
		if err := hostport.Check(context.Background(), nft, ms); err != nil {
			return checkErr("%v", err)
		}
	}
	return nil
}
