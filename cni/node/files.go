package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"knit.dev/knit/internal/atomicfile"
)

// writeIfChanged makes path hold exactly data (see atomicfile): readers
// (the plugin, the runtime's config watcher) see the old or the new file,
// never a torn one, and a power cut does not leave an empty conflist behind.
// It reports whether it wrote.
func writeIfChanged(path string, data []byte, mode fs.FileMode) (bool, error) {
	return atomicfile.WriteIfChanged(path, data, atomicfile.Options{Mode: mode})
}

// installBinary makes dst the plugin binary src, by mode. It reports
// whether it changed dst. A runtime executing the old dst is never
// disturbed: the new file is renamed over it.
func installBinary(src, dst string, mode InstallMode) (bool, error) {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, err
	}
	si, err := os.Stat(src)
	if err != nil {
		return false, fmt.Errorf("binary to install: %w", err)
	}
	if !si.Mode().IsRegular() {
		return false, fmt.Errorf("binary to install: %s is not a regular file", src)
	}
	tmp := atomicfile.TempName(dst)
	switch mode {
	case InstallSymlink:
		if target, err := os.Readlink(dst); err == nil && target == src {
			return false, nil
		}
		os.Remove(tmp)
		if err := os.Symlink(src, tmp); err != nil {
			return false, err
		}
		return true, atomicfile.Rename(tmp, dst)
	case InstallHardlink:
		if di, err := os.Stat(dst); err == nil && os.SameFile(si, di) {
			return false, nil
		}
		os.Remove(tmp)
		err := os.Link(src, tmp)
		if err == nil {
			return true, atomicfile.Rename(tmp, dst)
		}
		if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) {
			return false, err
		}
		// Another file system (e.g. the container image and a host
		// directory) or a protected link: copy instead.
	}
	// The installed copy carries the source's modification time; contents
	// are compared, not only size and time: images are built with fixed
	// timestamps, so two versions of the binary can agree on both.
	return atomicfile.CopyExecutable(src, dst)
}

// fileStamp identifies one version of a file cheaply: a rewrite through a
// rename (how anything installs a binary) or in place changes one of these.
type fileStamp struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
	mode     fs.FileMode
}

// stampOf is the Lstat of path as a fileStamp; ok false when it is missing.
func stampOf(path string) (fileStamp, bool) {
	fi, err := os.Lstat(path)
	if err != nil {
		return fileStamp{}, false
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime(), mode: fi.Mode()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.dev, st.ino = uint64(sys.Dev), sys.Ino
	}
	return st, true
}

// installCheck remembers the source and installed binary as the last
// install (or comparison) left them, so that a sync whose files are
// unchanged does not read both again (a copy is compared by contents).
type installCheck struct{ src, dst fileStamp }

// current reports whether src and dst are as they were at the last
// successful installBinary; remember records them after one.
func (c *installCheck) current(src, dst string) bool {
	s, ok1 := stampOf(src)
	d, ok2 := stampOf(dst)
	return ok1 && ok2 && c.src == s && c.dst == d
}

func (c *installCheck) remember(src, dst string) {
	c.src, _ = stampOf(src)
	c.dst, _ = stampOf(dst)
}

// shadowingConfs lists the CNI configurations in dir that a runtime would
// pick before ours (runtimes load the first file in lexical order).
func shadowingConfs(dir, ours string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || name >= ours {
			continue
		}
		switch filepath.Ext(name) {
		case ".conf", ".conflist", ".json":
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}
