package plugin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	cniversion "github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"knit.dev/knit/cni/hostport"
	"knit.dev/knit/cni/internal/nettest"
	"knit.dev/knit/cni/ipam"
)

// TestMain runs the tests in the network sandbox. The test binary doubles
// as the plugin: executed with CNI_COMMAND set (by the concurrency, kill -9
// and libcni tests) it runs Main. KNIT_TEST_BLOCK_AT=<stage> makes that
// plugin process create KNIT_TEST_READY and then hang at the stage, for a
// test to kill it there.
func TestMain(m *testing.M) {
	if os.Getenv("CNI_COMMAND") != "" {
		if stage := os.Getenv("KNIT_TEST_BLOCK_AT"); stage != "" {
			testFault = func(s string) error {
				if s == stage {
					os.WriteFile(os.Getenv("KNIT_TEST_READY"), nil, 0o644)
					select {}
				}
				return nil
			}
		}
		os.Exit(Main(os.Stdin, os.Stdout, os.Stderr, os.Getenv))
	}
	nettest.Main(m)
}

// node is one simulated node: a bridge, node.json in its own run dir, an
// IPAM store in its own state dir.
type node struct {
	t                testing.TB
	runDir, stateDir string
	cfg              NodeConfig
	bootFile         string
	fault            func(string) error
}

var bridgeSeq int

func newNode(t testing.TB, podCIDRs ...string) *node {
	t.Helper()
	nettest.Require(t)
	bridgeSeq++
	n := &node{
		t:        t,
		runDir:   t.TempDir(),
		stateDir: t.TempDir(),
		cfg:      NodeConfig{MTU: 1400, Bridge: fmt.Sprintf("kbr%d", bridgeSeq), Hairpin: true},
	}
	for _, c := range podCIDRs {
		n.cfg.PodCIDRs = append(n.cfg.PodCIDRs, netip.MustParsePrefix(c))
	}
	// Start from the real boot ID: plugin processes the tests start read
	// the real file.
	n.bootFile = filepath.Join(n.stateDir, "boot_id")
	boot, err := os.ReadFile(ipam.BootIDPath)
	if err != nil {
		t.Fatal(err)
	}
	n.setBoot(strings.TrimSpace(string(boot)))
	// What the agent does for a node.
	for _, s := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
		if err := writeSysctl(s, "1"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := EnsureBridge(n.cfg.Bridge, n.cfg.MTU, n.cfg.PodCIDRs, nil); err != nil {
		t.Fatal(err)
	}
	n.writeNodeConfig()
	t.Cleanup(func() { deleteLink(n.cfg.Bridge) })
	return n
}

func (n *node) setBoot(id string) {
	if err := os.WriteFile(n.bootFile, []byte(id+"\n"), 0o644); err != nil {
		n.t.Fatal(err)
	}
}

func (n *node) boot() string {
	b, err := os.ReadFile(n.bootFile)
	if err != nil {
		n.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (n *node) writeNodeConfig() {
	b, _ := json.Marshal(n.cfg)
	os.MkdirAll(filepath.Dir(NodeConfigPath(n.runDir)), 0o755)
	if err := os.WriteFile(NodeConfigPath(n.runDir), b, 0o644); err != nil {
		n.t.Fatal(err)
	}
}

// conf is the plugin configuration as libcni would pass it.
func (n *node) conf(version string, extra map[string]any) []byte {
	c := map[string]any{
		"cniVersion": version, "name": "knit", "type": "knit",
		"runDir": n.runDir, "stateDir": n.stateDir,
	}
	for k, v := range extra {
		c[k] = v
	}
	b, err := json.Marshal(c)
	if err != nil {
		n.t.Fatal(err)
	}
	return b
}

// call runs one command in process and returns stdout and the exit status.
func (n *node) call(cmd string, conf []byte, env map[string]string) (string, int) {
	var out, errb bytes.Buffer
	p := &plugin{stdout: &out, stderr: &errb, bootIDPath: n.bootFile, now: time.Now, newNFT: hostport.New, fault: n.fault}
	e := map[string]string{"CNI_COMMAND": cmd, "CNI_PATH": "/opt/cni/bin"}
	for k, v := range env {
		e[k] = v
	}
	code := p.main(bytes.NewReader(conf), func(k string) string { return e[k] })
	if errb.Len() > 0 {
		n.t.Logf("%s stderr: %s", cmd, errb.String())
	}
	return out.String(), code
}

// pod is a pod sandbox: a network namespace and a container ID.
type pod struct {
	id string
	ns ns.NetNS
}

func newPod(t testing.TB, id string) *pod {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	p := &pod{id: id, ns: netns}
	t.Cleanup(p.remove)
	return p
}

func (p *pod) remove() {
	if p.ns != nil {
		p.ns.Close()
		testutils.UnmountNS(p.ns)
		p.ns = nil
	}
}

func (p *pod) env() map[string]string {
	e := map[string]string{"CNI_CONTAINERID": p.id, "CNI_IFNAME": "eth0",
		"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + p.id + ";K8S_POD_UID=uid-" + p.id}
	if p.ns != nil {
		e["CNI_NETNS"] = p.ns.Path()
	}
	return e
}

// add runs ADD and returns the parsed result.
func (n *node) add(p *pod, version string, extra map[string]any) *current.Result {
	n.t.Helper()
	out, code := n.call("ADD", n.conf(version, extra), p.env())
	if code != 0 {
		n.t.Fatalf("ADD %s: exit %d: %s", p.id, code, out)
	}
	return parseResult(n.t, version, out)
}

func parseResult(t testing.TB, version, out string) *current.Result {
	t.Helper()
	res, err := cniversion.NewResult(version, []byte(out))
	var r *current.Result
	if err == nil {
		r, err = current.NewResultFromResult(res)
	}
	if err != nil {
		t.Fatalf("parse %s result %s: %v", version, out, err)
	}
	return r
}

func (n *node) mustCode(cmd string, conf []byte, env map[string]string, code uint, msgPart string) {
	n.t.Helper()
	out, status := n.call(cmd, conf, env)
	if status == 0 {
		n.t.Fatalf("%s succeeded, want error %d: %s", cmd, code, out)
	}
	e := cniError(n.t, out)
	if e.Code != code || !strings.Contains(e.Msg, msgPart) {
		n.t.Fatalf("%s: error %d %q, want %d containing %q", cmd, e.Code, e.Msg, code, msgPart)
	}
}

type errorObject struct {
	CNIVersion string `json:"cniVersion"`
	Code       uint   `json:"code"`
	Msg        string `json:"msg"`
}

func cniError(t testing.TB, out string) errorObject {
	t.Helper()
	var e errorObject
	if err := json.Unmarshal([]byte(out), &e); err != nil || e.CNIVersion == "" {
		t.Fatalf("not a CNI error object: %q (%v)", out, err)
	}
	return e
}

func (n *node) store() *ipam.State {
	n.t.Helper()
	s, err := ipam.Open(IPAMDir(n.stateDir), "knit", ipam.Options{Boot: n.boot()})
	if err != nil {
		n.t.Fatal(err)
	}
	st, err := s.View()
	if err != nil {
		n.t.Fatal(err)
	}
	return st
}

func linkExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// inNS runs f in p's namespace.
func (p *pod) in(t testing.TB, f func() error) {
	t.Helper()
	if err := p.ns.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// execPlugin runs the test binary as the plugin in a child process.
func execPlugin(cmd string, conf []byte, env map[string]string, extraEnv ...string) *exec.Cmd {
	c := exec.Command(os.Args[0])
	c.Env = append(os.Environ(), "CNI_COMMAND="+cmd, "CNI_PATH=/opt/cni/bin")
	for k, v := range env {
		c.Env = append(c.Env, k+"="+v)
	}
	c.Env = append(c.Env, extraEnv...)
	c.Stdin = bytes.NewReader(conf)
	return c
}

func ipOf(r *current.Result, v6 bool) net.IP {
	for _, ipc := range r.IPs {
		if (ipc.Address.IP.To4() == nil) == v6 {
			return ipc.Address.IP
		}
	}
	return nil
}
