package uninstall

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
	"time"
)

// TestInstallThenPlanFiles: what InstallBinary puts down is exactly what
// planFiles finds, and installing again changes nothing.
func TestInstallThenPlanFiles(t *testing.T) {
	fs := newNode(t)
	src := filepath.Join(t.TempDir(), "knit-build")
	write(t, src, "#!binary")
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(src, old, old); err != nil {
		t.Fatal(err)
	}
	links := []string{"knit-agent", "knit-dns"}
	if err := InstallBinary(src, fs.bin, links); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(fs.bin, "knit")
	fi, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 || !fi.ModTime().Equal(old) {
		t.Errorf("installed binary: mode %v, mtime %v; want 0755 and the source's %v", fi.Mode(), fi.ModTime(), old)
	}
	for _, l := range links {
		if target, err := os.Readlink(filepath.Join(fs.bin, l)); err != nil || target != "knit" {
			t.Errorf("%s -> %q, %v; want knit", l, target, err)
		}
	}
	// Idempotent: the same inode stays (nothing rewritten).
	if err := InstallBinary(src, fs.bin, links); err != nil {
		t.Fatal(err)
	}
	if fi2, _ := os.Stat(dst); !os.SameFile(fi, fi2) {
		t.Error("second install rewrote an up-to-date binary")
	}

	// Same size and time, other bytes (two image versions built with fixed
	// timestamps): the new binary must still be installed.
	write(t, src, "#!binarz")
	if err := os.Chtimes(src, old, old); err != nil {
		t.Fatal(err)
	}
	if err := InstallBinary(src, fs.bin, links); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(dst); string(b) != "#!binarz" {
		t.Errorf("binary of equal size and time but other content not replaced: %q", b)
	}

	cfg := fs.config()
	cfg.Symlinks = links
	steps, err := planFiles(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range steps {
		got = append(got, s.What)
	}
	want := []string{"file " + dst, "file " + filepath.Join(fs.bin, "knit-agent"), "file " + filepath.Join(fs.bin, "knit-dns")}
	if !slices.Equal(got, want) {
		t.Errorf("planFiles = %q, want %q", got, want)
	}
	if err := Apply(steps); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(fs.bin); len(entries) != 0 {
		t.Errorf("bin dir not empty after Apply: %v", entries)
	}
}

// TestInstallKeepsForeignFiles: a regular file where a knit-* link would go
// is someone else's; install refuses to replace it.
func TestInstallKeepsForeignFiles(t *testing.T) {
	fs := newNode(t)
	src := filepath.Join(t.TempDir(), "knit")
	write(t, src, "#!binary")
	write(t, filepath.Join(fs.bin, "knit-dns"), "mine")
	if err := InstallBinary(src, fs.bin, []string{"knit-dns"}); err == nil {
		t.Fatal("InstallBinary replaced a regular file with a symlink")
	}
	if b, _ := os.ReadFile(filepath.Join(fs.bin, "knit-dns")); string(b) != "mine" {
		t.Errorf("foreign file changed: %q", b)
	}
}

func TestRunDirsAndOtherConfs(t *testing.T) {
	fs := newNode(t)
	cfg := fs.config()
	cfg.RunDir = "/run/knit"
	if got := runDirs(cfg); !slices.Equal(got, []string{"/run/knit"}) {
		t.Errorf("runDirs without conflist = %v", got)
	}
	fs.knitFiles(t)
	if got := runDirs(cfg); !slices.Equal(got, []string{"/run/knit", fs.run}) {
		t.Errorf("runDirs = %v, want the conflist's too", got)
	}
	for name, body := range map[string]string{
		"10-flannel.conflist": `{"plugins":[{"type":"flannel"},{"type":"bridge","bridge":"cni0"}]}`,
		"05-old.conf":         `{"type":"bridge","bridge":"cni0"}`,
		"30-broken.conf":      `{not json`,
		"40-other.conflist":   `{"plugins":[{"type":"bridge","bridge":"br1"}]}`,
		"README":              `"bridge":"cni0"`,
	} {
		write(t, filepath.Join(fs.conf, name), body)
	}
	got, err := otherConfsNaming(fs.conf, "cni0")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"05-old.conf", "10-flannel.conflist", "30-broken.conf"}; !slices.Equal(got, want) {
		t.Errorf("otherConfsNaming = %v, want %v", got, want)
	}
}

// TestNamesMatchTheirOwners checks the names this package repeats against
// the declarations in the packages that own them (unexported there).
func TestNamesMatchTheirOwners(t *testing.T) {
	for _, c := range []struct{ file, pattern string }{
		{"../overlay/model.go", `(?m)^\s*(const\s+)?routeProtocol\s*=\s*75\b`},
		{"../overlay/model.go", `(?m)^\s*deviceV4\s*=\s*"` + VXLANv4 + `"`},
		{"../overlay/model.go", `(?m)^\s*deviceV6\s*=\s*"` + VXLANv6 + `"`},
		{"../overlay/masq.go", `(?m)^\s*nftTable\s*=\s*"` + OverlayTable + `"`},
		{"../proxy/render.go", `(?m)^\s*tableName\s*=\s*"` + ProxyTable + `"`},
		{"../proxy/proxier.go", `knftables\.New\(knftables\.InetFamily, tableName\)`},
		{"../overlay/overlay.go", `knftables\.New\(knftables\.InetFamily, nftTable\)`},
		{"../ingress/guard.go", `(?m)^\s*(const\s+)?guardTable\s*=\s*"` + IngressTable + `"`},
		{"../dns/guard.go", `(?m)^\s*(const\s+)?guardTable\s*=\s*"` + DNSTable + `"`},
		{"../ingress/controller.go", `knftables\.New\(knftables\.InetFamily, guardTable\)`},
	} {
		b, err := os.ReadFile(c.file)
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(c.pattern).Match(b) {
			t.Errorf("%s no longer matches %s: update package uninstall", c.file, c.pattern)
		}
	}
}
