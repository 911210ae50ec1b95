package cp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// EnvRepo, if set, names the knit repository root, overriding the search from
// the working directory.
const EnvRepo = "KNIT_REPO"

const (
	binaryName = "knit-controlplane"
	rootModule = "knit.dev/knit"
	moduleDir  = "lab/controlplane"
)

// RepoRoot returns the knit repository root: $KNIT_REPO if set, else the
// nearest ancestor of the working directory whose go.mod declares module
// knit.dev/knit (tests run in their package directory, so this finds it).
func RepoRoot() (string, error) {
	if r := os.Getenv(EnvRepo); r != "" {
		return filepath.Abs(r)
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if data, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && modulePath(data) == rootModule {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("cp: no go.mod for module %s above the working directory; set %s", rootModule, EnvRepo)
		}
		dir = parent
	}
}

func modulePath(gomod []byte) string {
	for line := range strings.Lines(string(gomod)) {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`)
		}
	}
	return ""
}

// Build builds the knit-controlplane binary from lab/controlplane into
// <cacheDir>/bin and returns its path. An empty cacheDir means <repo>/.cache.
// The build is skipped when the binary is newer than every *.go file, go.mod
// and go.sum of that module (a cold build takes minutes). Changes to the build
// flags in this file are not detected: delete the binary after editing them.
//
// Concurrent callers (test packages run in parallel) are serialised with a
// lock file, and the binary is replaced by rename, so nobody runs a
// half-written file.
//
// Build needs the Go module proxy on a cold module cache, which a sandbox
// cannot reach: call it before entering one (e.g. in TestMain before
// sandbox.Main). Inside a sandbox it works only when the modules are cached.
func Build(ctx context.Context, cacheDir string) (string, error) {
	return build(ctx, cacheDir, binaryName, ".", "lab control plane")
}

// BuildKubeProxy builds kube-proxy alone, the way upstream ships it (package
// k8s.io/kubernetes/cmd/kube-proxy of the control plane's module, the same
// pinned version and version stamp), into <cacheDir>/bin/knit-kube-proxy,
// under the same rules as Build. The control plane binary runs kube-proxy
// too, but it also links etcd, the API server and the controller manager,
// whose package initialisation alone costs tens of megabytes: a memory
// comparison needs the standalone binary. With the control plane built, the
// packages are in the Go build cache and this is one link step.
func BuildKubeProxy(ctx context.Context, cacheDir string) (string, error) {
	return build(ctx, cacheDir, kubeProxyBinary, "k8s.io/kubernetes/cmd/kube-proxy", "kube-proxy anchor")
}

const kubeProxyBinary = "knit-kube-proxy"

// build runs `go build pkg` in the control plane's module into
// <cacheDir>/bin/<name>, unless that binary is newer than the module's
// sources.
func build(ctx context.Context, cacheDir, name, pkg, what string) (string, error) {
	repo, err := RepoRoot()
	if err != nil {
		return "", err
	}
	if cacheDir == "" {
		cacheDir = filepath.Join(repo, ".cache")
	}
	src := filepath.Join(repo, moduleDir)
	binDir := filepath.Join(cacheDir, "bin")
	bin := filepath.Join(binDir, name)
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return "", err
	}

	lock, err := os.OpenFile(filepath.Join(binDir, "."+name+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("cp: locking build: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	fresh, err := upToDate(bin, src)
	if err != nil {
		return "", err
	}
	if fresh {
		return bin, nil
	}

	ldflags, err := versionLDFlags(filepath.Join(src, "go.mod"))
	if err != nil {
		return "", err
	}
	tmp := bin + ".tmp"
	args := []string{"build", "-trimpath", "-ldflags=" + ldflags, "-o", tmp, pkg}
	goCmd := "go"
	if nice, err := exec.LookPath("nice"); err == nil {
		// The lab machine's cores are shared; do not starve other work.
		goCmd, args = nice, append([]string{"-n", "10", "go"}, args...)
	}
	cmd := exec.CommandContext(ctx, goCmd, args...)
	cmd.Dir = src
	// GOWORK=off: the nested module builds from its own go.mod/go.sum only.
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	slog.Info("building "+what+" (minutes when cold)", "dir", src, "out", bin)
	start := time.Now()
	if err := cmd.Run(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("cp: go build %s in %s: %w\n%s", pkg, src, err, out.Bytes())
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", err
	}
	slog.Info("built "+what, "out", bin, "took", time.Since(start).Round(time.Second))
	return bin, nil
}

// versionLDFlags stamps the Kubernetes version from go.mod into the binary, as
// upstream's hack/lib/version.sh does; without it /version reports
// v0.0.0-master.
func versionLDFlags(gomod string) (string, error) {
	data, err := os.ReadFile(gomod)
	if err != nil {
		return "", err
	}
	var v string
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "k8s.io/kubernetes" {
			v = f[1]
		}
	}
	parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
	if len(parts) < 2 {
		return "", fmt.Errorf("cp: no k8s.io/kubernetes version in %s", gomod)
	}
	var flags []string
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		flags = append(flags,
			"-X", pkg+".gitVersion="+v,
			"-X", pkg+".gitMajor="+parts[0],
			"-X", pkg+".gitMinor="+parts[1],
			"-X", pkg+".gitTreeState=clean")
	}
	return strings.Join(flags, " "), nil
}

// upToDate reports whether bin exists and is newer than the module's sources.
func upToDate(bin, src string) (bool, error) {
	bi, err := os.Stat(bin)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || !(strings.HasSuffix(n, ".go") || n == "go.mod" || n == "go.sum") {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return false, err
		}
		if !info.ModTime().Before(bi.ModTime()) {
			return false, nil
		}
	}
	return true, nil
}
