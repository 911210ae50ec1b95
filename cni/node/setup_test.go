package node

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
)

// fixedMTU is a Config.MTU whose value a test changes.
func fixedMTU(v int) (func() int, *atomic.Int64) {
	var a atomic.Int64
	a.Store(int64(v))
	return func() int { return int(a.Load()) }, &a
}

func TestWaitsForPodCIDRThenWritesFiles(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1"))
	h.sync()
	if h.s.Ready() || exists(h.nodeJSONPath()) || exists(h.confPath()) || len(h.k.bridgeMTU) > 0 || len(h.k.sysctls) > 0 {
		t.Fatal("without a podCIDR: nothing may be written or configured")
	}

	h.updateNode(testNode("n1", "10.42.1.0/24", "fd42:0:0:1::/64"))
	h.sync()
	if !h.s.Ready() {
		t.Fatal("not ready after the podCIDR arrived")
	}
	nc, err := plugin.ReadNodeConfig(h.cfg.RunDir)
	if err != nil {
		t.Fatal(err)
	}
	if nc.MTU != 1450 || nc.Bridge != "cni0" || !nc.Hairpin || len(nc.PodCIDRs) != 2 || nc.PodCIDRs[1] != pfx("fd42:0:0:1::/64") {
		t.Fatalf("node.json: %+v", nc)
	}
	if got := h.read(h.confPath()); got != string(renderConfList(&h.cfg)) {
		t.Fatalf("conflist:\n%s", got)
	}
	if !strings.Contains(h.read(h.confPath()), `"runDir": "`+h.cfg.RunDir+`"`) {
		t.Fatal("conflist does not carry the run dir")
	}
	if h.k.bridgeMTU["cni0"] != 1450 || !h.k.bridgeAddr["cni0"][pfx("10.42.1.1/24")] || !h.k.bridgeAddr["cni0"][pfx("fd42:0:0:1::1/64")] {
		t.Fatalf("bridge: mtu %v addrs %v", h.k.bridgeMTU, h.k.bridgeAddr)
	}
	for path, want := range map[string]string{
		"net/ipv4/ip_forward":                 "1",
		"net/ipv6/conf/all/forwarding":        "1",
		"net/ipv4/conf/all/send_redirects":    "0",
		"net/bridge/bridge-nf-call-iptables":  "1",
		"net/bridge/bridge-nf-call-ip6tables": "1",
		"net/ipv4/conf/cni0/send_redirects":   "0",
		"net/ipv6/conf/cni0/accept_ra":        "0",
	} {
		if h.k.sysctls[path] != want {
			t.Errorf("sysctl %s = %q, want %q", path, h.k.sysctls[path], want)
		}
	}
}

func TestMTU(t *testing.T) {
	t.Run("from the overlay", func(t *testing.T) {
		mtu, set := fixedMTU(0)
		h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
		h.sync()
		if h.s.Ready() || exists(h.nodeJSONPath()) || exists(h.confPath()) {
			t.Fatal("MTU 0 (overlay not ready): nothing may be written")
		}
		set.Store(1450)
		h.sync()
		nc, err := plugin.ReadNodeConfig(h.cfg.RunDir)
		if err != nil || nc.MTU != 1450 || !h.s.Ready() {
			t.Fatalf("after the MTU is known: %+v, %v, ready %v", nc, err, h.s.Ready())
		}
		confBefore, _ := os.Stat(h.confPath())

		set.Store(1400)
		h.sync()
		nc, err = plugin.ReadNodeConfig(h.cfg.RunDir)
		if err != nil || nc.MTU != 1400 || h.k.bridgeMTU["cni0"] != 1400 {
			t.Fatalf("after the MTU changed: %+v, %v, bridge %d", nc, err, h.k.bridgeMTU["cni0"])
		}
		// The conflist does not carry the MTU: same file, not rewritten
		// (a rewrite would make runtimes that watch the dir reload).
		confAfter, _ := os.Stat(h.confPath())
		if !os.SameFile(confBefore, confAfter) {
			t.Fatal("conflist was replaced although its content did not change")
		}
		// A change back to 0 (overlay lost its underlay) keeps what was
		// written: pods still need a config.
		set.Store(0)
		h.sync()
		if nc, err := plugin.ReadNodeConfig(h.cfg.RunDir); err != nil || nc.MTU != 1400 || !h.s.Ready() {
			t.Fatalf("after MTU 0 again: %+v, %v", nc, err)
		}
	})
	for _, tc := range []struct {
		name     string
		routeMTU int
		want     int
	}{
		{"default route interface", 9000, 9000},
		{"no default route", 0, 1500},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, Config{}, testNode("n1", "10.42.1.0/24"))
			h.k.routeMTU = tc.routeMTU
			h.sync()
			if nc, err := plugin.ReadNodeConfig(h.cfg.RunDir); err != nil || nc.MTU != tc.want {
				t.Fatalf("node.json %+v, %v; want MTU %d", nc, err, tc.want)
			}
		})
	}
}

func TestPodCIDRChangeRewritesAndMovesGateway(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu, ClusterCIDRs: []netip.Prefix{pfx("10.42.0.0/16")}}, testNode("n1", "10.42.1.0/24"))
	h.k.bridgeAddr["cni0"] = map[netip.Prefix]bool{pfx("192.0.2.1/24"): true} // someone else's
	h.sync()
	h.updateNode(testNode("n1", "10.42.7.0/24"))
	h.sync()
	nc, err := plugin.ReadNodeConfig(h.cfg.RunDir)
	if err != nil || nc.PodCIDRs[0] != pfx("10.42.7.0/24") {
		t.Fatalf("node.json %+v %v", nc, err)
	}
	addrs := h.k.bridgeAddr["cni0"]
	if addrs[pfx("10.42.1.1/24")] || !addrs[pfx("10.42.7.1/24")] || !addrs[pfx("192.0.2.1/24")] {
		t.Fatalf("bridge addresses %v: want the new gateway, not the old one, and the foreign one kept", addrs)
	}
}

// TestPreviousPodCIDROutsideClusterCIDRs: a gateway knit wrote in an
// earlier run (found in the node.json it left) is removed even when the
// cluster CIDRs are not configured.
func TestPreviousPodCIDROutsideClusterCIDRs(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	os.MkdirAll(filepath.Join(h.cfg.RunDir, "cni"), 0o755)
	os.WriteFile(h.nodeJSONPath(), []byte(`{"podCIDRs":["10.99.0.0/24"],"mtu":1450,"bridge":"cni0"}`), 0o644)
	h.k.bridgeAddr["cni0"] = map[netip.Prefix]bool{pfx("10.99.0.1/24"): true}
	h.s.loadPrevious()
	h.sync()
	if h.k.bridgeAddr["cni0"][pfx("10.99.0.1/24")] || !h.k.bridgeAddr["cni0"][pfx("10.42.1.1/24")] {
		t.Fatalf("bridge addresses %v", h.k.bridgeAddr["cni0"])
	}
}

// snapshot is every file under dir with its content and modification time.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		b, _ := os.ReadFile(path)
		out[path] = fi.ModTime().String() + "|" + string(b)
		return nil
	})
	return out
}

func TestUserFilesUntouched(t *testing.T) {
	mtu, set := fixedMTU(1450)
	src := filepath.Join(t.TempDir(), "knit")
	os.WriteFile(src, []byte("#!binary v1"), 0o755)
	h := newHarness(t, Config{MTU: mtu, BinaryPath: src}, testNode("n1", "10.42.1.0/24"))
	user := map[string]string{
		filepath.Join(h.cfg.ConfDir, "05-other.conflist"):   `{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}`,
		filepath.Join(h.cfg.ConfDir, "99-loopback.conf"):    `{"cniVersion":"1.0.0","name":"lo","type":"loopback"}`,
		filepath.Join(h.cfg.ConfDir, "notes.txt"):           "mine",
		filepath.Join(h.cfg.ConfDir, "sub", "x.conflist"):   "{}",
		filepath.Join(h.cfg.BinDir, "bridge"):               "#!other plugin",
		filepath.Join(h.cfg.BinDir, "knit-old"):             "#!old",
		filepath.Join(h.cfg.RunDir, "cni", "other.json"):    "{}",
		filepath.Join(h.cfg.RunDir, "cni", "node.json.bak"): "{}",
	}
	for path, content := range user {
		os.MkdirAll(filepath.Dir(path), 0o755)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	before := map[string]string{}
	for _, d := range []string{h.cfg.ConfDir, h.cfg.BinDir, h.cfg.RunDir} {
		for k, v := range snapshot(t, d) {
			before[k] = v
		}
	}
	time.Sleep(10 * time.Millisecond) // so that a rewrite would show in the modification time

	h.sync()
	set.Store(1400)
	h.updateNode(testNode("n1", "10.42.2.0/24"))
	h.sync()
	h.sync()
	if !h.s.Ready() {
		t.Fatal("not ready")
	}
	after := map[string]string{}
	for _, d := range []string{h.cfg.ConfDir, h.cfg.BinDir, h.cfg.RunDir} {
		for k, v := range snapshot(t, d) {
			after[k] = v
		}
	}
	for path, v := range before {
		if after[path] != v {
			t.Errorf("%s was changed or removed", path)
		}
	}
	ours := map[string]bool{h.confPath(): true, h.nodeJSONPath(): true, filepath.Join(h.cfg.BinDir, "knit"): true}
	for path := range after {
		if _, was := before[path]; !was && !ours[path] {
			t.Errorf("unexpected file %s left behind", path)
		}
	}
	for path := range ours {
		if _, ok := after[path]; !ok {
			t.Errorf("%s not written", path)
		}
	}
}

// TestConflistOnlyAfterEverythingElse: the conflist (what makes the
// runtime call the plugin) appears only after the bridge, node.json and the
// binary are in place.
func TestConflistOnlyAfterEverythingElse(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	src := filepath.Join(t.TempDir(), "knit")
	h := newHarness(t, Config{MTU: mtu, BinaryPath: src}, testNode("n1", "10.42.1.0/24"))

	h.k.failBridge = errors.New("netlink says no")
	if err := h.s.sync(); err == nil || !strings.Contains(err.Error(), "netlink says no") {
		t.Fatalf("sync with a failing bridge: %v", err)
	}
	if exists(h.nodeJSONPath()) || exists(h.confPath()) || h.s.Ready() {
		t.Fatal("files written although the bridge failed")
	}
	h.k.failBridge = nil

	// The binary to install does not exist (yet).
	if err := h.s.sync(); err == nil || !strings.Contains(err.Error(), "binary") {
		t.Fatalf("sync with a missing binary: %v", err)
	}
	if !exists(h.nodeJSONPath()) || exists(h.confPath()) || h.s.Ready() {
		t.Fatal("want node.json but no conflist while the plugin binary is missing")
	}
	if got := testutil.ToFloat64(h.s.m.syncErrors.WithLabelValues("binary")); got != 1 {
		t.Fatalf("binary sync errors %v", got)
	}

	os.WriteFile(src, []byte("#!knit"), 0o755)
	h.sync()
	if !exists(h.confPath()) || !h.s.Ready() || h.read(filepath.Join(h.cfg.BinDir, "knit")) != "#!knit" {
		t.Fatal("conflist or binary missing once everything is in place")
	}
}

func TestOptionalSysctlMissing(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	h.k.missing["net/bridge/bridge-nf-call-iptables"] = true
	h.sync()
	if !h.s.Ready() {
		t.Fatal("a missing optional sysctl must not block the node")
	}
	h.k.missing["net/ipv4/ip_forward"] = true
	delete(h.k.sysctls, "net/ipv4/ip_forward")
	if err := h.s.sync(); err == nil || !strings.Contains(err.Error(), "ip_forward") {
		t.Fatalf("a missing required sysctl: %v", err)
	}
}

func TestInstallBinary(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src", "knit")
	os.MkdirAll(filepath.Dir(src), 0o755)
	os.WriteFile(src, []byte("#!knit v1"), 0o755)
	stat := func(p string) os.FileInfo {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi
	}
	install := func(dst string, mode InstallMode, wantChanged bool) {
		t.Helper()
		changed, err := installBinary(src, dst, mode)
		if err != nil || changed != wantChanged {
			t.Fatalf("installBinary(%s): changed %v, err %v; want changed %v", mode, changed, err, wantChanged)
		}
	}

	t.Run("copy", func(t *testing.T) {
		dst := filepath.Join(dir, "copy", "knit")
		install(dst, InstallCopy, true)
		first := stat(dst)
		if os.SameFile(first, stat(src)) || first.Mode().Perm() != 0o755 || string(mustRead(t, dst)) != "#!knit v1" {
			t.Fatalf("copy: %v %v", first.Mode(), string(mustRead(t, dst)))
		}
		install(dst, InstallCopy, false) // unchanged source: not copied again
		if !os.SameFile(first, stat(dst)) {
			t.Fatal("unchanged binary was replaced")
		}
		os.WriteFile(src, []byte("#!knit v2, longer"), 0o755)
		install(dst, InstallCopy, true)
		if string(mustRead(t, dst)) != "#!knit v2, longer" {
			t.Fatal("changed binary not copied")
		}
		// Same size, new modification time (a rebuilt binary).
		os.WriteFile(src, []byte("#!knit v3, longer"), 0o755)
		os.Chtimes(src, time.Now().Add(time.Hour), time.Now().Add(time.Hour))
		install(dst, InstallCopy, true)
		if string(mustRead(t, dst)) != "#!knit v3, longer" {
			t.Fatal("rebuilt binary not copied")
		}
		if entries, _ := os.ReadDir(filepath.Dir(dst)); len(entries) != 1 {
			t.Fatalf("temporary files left: %v", entries)
		}
	})
	t.Run("hardlink", func(t *testing.T) {
		dst := filepath.Join(dir, "link", "knit")
		install(dst, InstallHardlink, true)
		if !os.SameFile(stat(src), stat(dst)) {
			t.Fatal("not a hard link")
		}
		install(dst, InstallHardlink, false)
	})
	t.Run("symlink", func(t *testing.T) {
		dst := filepath.Join(dir, "sym", "knit")
		install(dst, InstallSymlink, true)
		if target, err := os.Readlink(dst); err != nil || target != src {
			t.Fatalf("symlink -> %q, %v", target, err)
		}
		install(dst, InstallSymlink, false)
	})
	t.Run("replaces a file of another mode", func(t *testing.T) {
		dst := filepath.Join(dir, "switch", "knit")
		install(dst, InstallSymlink, true)
		install(dst, InstallCopy, true)
		if fi, _ := os.Lstat(dst); !fi.Mode().IsRegular() {
			t.Fatal("copy did not replace the symlink")
		}
	})
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestPoolMetrics(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24", "fd42:0:0:1::/64"))
	h.sync()
	store, err := h.s.openStore()
	if err != nil {
		t.Fatal(err)
	}
	pools := []netip.Prefix{pfx("10.42.1.0/24"), pfx("fd42:0:0:1::/64")}
	store.Update(func(st *ipam.State) error {
		for _, id := range []string{"a", "b", "c"} {
			if _, err := st.Allocate(ipam.Request{Attachment: ipam.Attachment{ContainerID: id, IfName: "eth0"}}, pools); err != nil {
				return err
			}
		}
		return nil
	})
	want := `
# HELP knit_cni_allocated_ips Addresses of this node's podCIDR reserved in the IPAM store, by IP family.
# TYPE knit_cni_allocated_ips gauge
knit_cni_allocated_ips{family="ipv4"} 3
knit_cni_allocated_ips{family="ipv6"} 3
# HELP knit_cni_pool_size Addresses the plugin can hand out from this node's podCIDR, by IP family.
# TYPE knit_cni_pool_size gauge
knit_cni_pool_size{family="ipv4"} 253
knit_cni_pool_size{family="ipv6"} 1.8446744073709552e+19
`
	if err := testutil.GatherAndCompare(h.reg, strings.NewReader(want), "knit_cni_allocated_ips", "knit_cni_pool_size"); err != nil {
		t.Fatal(err)
	}
}

// TestRun drives the real loop: ready after the first sync, a Node update
// and an MTU change each rewrite node.json, and stopping removes nothing.
func TestRun(t *testing.T) {
	mtu, set := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	ctx, cancel := context.WithCancel(h.ctx)
	done := make(chan error, 1)
	go func() { done <- h.s.Run(ctx) }()
	waitFor(t, "ready", h.s.Ready)

	nodeMTU := func() int {
		nc, err := plugin.ReadNodeConfig(h.cfg.RunDir)
		if err != nil {
			return -1
		}
		return nc.MTU
	}
	nodeCIDR := func() string {
		nc, err := plugin.ReadNodeConfig(h.cfg.RunDir)
		if err != nil {
			return ""
		}
		return nc.PodCIDRs[0].String()
	}
	h.updateNode(testNode("n1", "10.42.3.0/24"))
	waitFor(t, "node.json with the new podCIDR", func() bool { return nodeCIDR() == "10.42.3.0/24" })
	set.Store(1380)
	waitFor(t, "node.json with the new MTU", func() bool { return nodeMTU() == 1380 })

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run returned %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if !exists(h.nodeJSONPath()) || !exists(h.confPath()) {
		t.Fatal("files removed on shutdown")
	}
}

// TestInstallCheck: a sync skips the install only while neither the source
// nor the installed binary changed since the last install.
func TestInstallCheck(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "knit-cni"), filepath.Join(dir, "bin", "knit")
	if err := os.WriteFile(src, []byte("v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	var c installCheck
	if c.current(src, dst) {
		t.Fatal("current before anything was installed")
	}
	if _, err := installBinary(src, dst, InstallCopy); err != nil {
		t.Fatal(err)
	}
	c.remember(src, dst)
	stamp := time.Unix(1e9, 0)
	for _, step := range []struct {
		name        string
		change      func()
		wantCurrent bool
	}{
		{"unchanged", func() {}, true},
		{"source replaced, same size and time", func() {
			tmp := src + ".new"
			os.WriteFile(tmp, []byte("v2"), 0o755)
			os.Chtimes(tmp, stamp, stamp)
			os.Rename(tmp, src)
		}, false},
		{"installed copy removed", func() { os.Remove(dst) }, false},
	} {
		if _, err := installBinary(src, dst, InstallCopy); err != nil {
			t.Fatal(err)
		}
		c.remember(src, dst)
		step.change()
		if got := c.current(src, dst); got != step.wantCurrent {
			t.Errorf("%s: current = %v, want %v", step.name, got, step.wantCurrent)
		}
	}
}
