// Package anchors builds the upstream programs knit is benchmarked against
// (DESIGN.md, "Anchors"), each from a Go module of its own under this
// directory so that the product's go.mod never inherits their dependencies:
//
//	lab/anchors/coredns   CoreDNS at a pinned release with the kubernetes,
//	                      cache, forward, errors, health and bind plugins
//	                      -> <cacheDir>/bin/knit-coredns
//
// The data flow is one way: the nested module's sources -> `go build` (only
// when a source is newer than the binary) -> a binary in the build cache ->
// the benchmarks in bench/, which copy it into their work directory and run
// it inside the lab sandbox.
package anchors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"knit.dev/knit/lab/cp"
)

const (
	corednsBinary = "knit-coredns"
	corednsDir    = "lab/anchors/coredns"
)

// Build builds CoreDNS from lab/anchors/coredns into <cacheDir>/bin and
// returns the binary's path. An empty cacheDir means <repo>/.cache. As
// cp.Build does for the control plane, the build is skipped when the binary
// is newer than every *.go file, go.mod and go.sum of the module (a cold
// build takes about three minutes on the lab machine); concurrent callers
// are serialised with a lock file and the binary is replaced by rename.
//
// A cold module cache needs the Go module proxy, which a sandbox cannot
// reach: run `go mod download` in lab/anchors/coredns (or call Build) before
// entering one.
func Build(ctx context.Context, cacheDir string) (string, error) {
	repo, err := cp.RepoRoot()
	if err != nil {
		return "", err
	}
	if cacheDir == "" {
		cacheDir = filepath.Join(repo, ".cache")
	}
	src := filepath.Join(repo, corednsDir)
	binDir := filepath.Join(cacheDir, "bin")
	bin := filepath.Join(binDir, corednsBinary)
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return "", err
	}

	lock, err := os.OpenFile(filepath.Join(binDir, "."+corednsBinary+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("anchors: locking build: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	fresh, err := upToDate(bin, src)
	if err != nil {
		return "", err
	}
	if fresh {
		return bin, nil
	}

	tmp := bin + ".tmp"
	args := []string{"build", "-trimpath", "-o", tmp, "."}
	name := "go"
	if nice, err := exec.LookPath("nice"); err == nil {
		// The lab machine's cores are shared; do not starve other work.
		name, args = nice, append([]string{"-n", "10", "go"}, args...)
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = src
	// GOWORK=off: the nested module builds from its own go.mod/go.sum only.
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	slog.Info("building CoreDNS anchor (minutes when cold)", "dir", src, "out", bin)
	start := time.Now()
	if err := cmd.Run(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("anchors: go build in %s: %w\n%s", src, err, out.Bytes())
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", err
	}
	slog.Info("built CoreDNS anchor", "out", bin, "took", time.Since(start).Round(time.Second))
	return bin, nil
}

// upToDate reports whether bin exists and is newer than the module's Go
// sources, go.mod and go.sum.
func upToDate(bin, src string) (bool, error) {
	bi, err := os.Stat(bin)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	newer := errors.New("newer")
	err = filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		n := d.Name()
		if d.IsDir() || !(strings.HasSuffix(n, ".go") || n == "go.mod" || n == "go.sum") {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if !info.ModTime().Before(bi.ModTime()) {
			return newer
		}
		return nil
	})
	if errors.Is(err, newer) {
		return false, nil
	}
	return err == nil, err
}
