package node

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// tmpName is the temporary file next to path that writes go through. It
// starts with a dot and ends in .knit-tmp, so neither libcni (which reads
// *.conf, *.conflist, *.json) nor the plugin ever reads a half-written one.
func tmpName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".knit-tmp")
}

// writeIfChanged makes path hold exactly data: unless it already does, data
// goes to a temporary file in the same directory, which is synced and
// renamed over path, and the directory is synced. Readers (the plugin, the
// runtime's config watcher) see the old or the new file, never a torn one,
// and a power cut does not leave an empty conflist behind. It reports
// whether it wrote.
func writeIfChanged(path string, data []byte, mode fs.FileMode) (bool, error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	err := replace(path, mode, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	})
	return err == nil, err
}

// replace writes a temporary file with fill, syncs it, renames it over path
// and syncs the directory.
func replace(path string, mode fs.FileMode, fill func(*os.File) error) error {
	tmp := tmpName(path)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	err = f.Chmod(mode) // an older temporary file keeps its mode through O_CREATE
	if err == nil {
		err = fill(f)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
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
	tmp := tmpName(dst)
	switch mode {
	case InstallSymlink:
		if target, err := os.Readlink(dst); err == nil && target == src {
			return false, nil
		}
		os.Remove(tmp)
		if err := os.Symlink(src, tmp); err != nil {
			return false, err
		}
		return true, renameSynced(tmp, dst)
	case InstallHardlink:
		if di, err := os.Stat(dst); err == nil && os.SameFile(si, di) {
			return false, nil
		}
		os.Remove(tmp)
		err := os.Link(src, tmp)
		if err == nil {
			return true, renameSynced(tmp, dst)
		}
		if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) {
			return false, err
		}
		// Another file system (e.g. the container image and a host
		// directory) or a protected link: copy instead.
	}
	if di, err := os.Lstat(dst); err == nil && di.Mode().IsRegular() &&
		(os.SameFile(si, di) || (di.Size() == si.Size() && di.ModTime().Equal(si.ModTime()) && di.Mode().Perm() == 0o755)) {
		return false, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return false, err
	}
	defer in.Close()
	err = replace(dst, 0o755, func(f *os.File) error {
		if _, err := io.Copy(f, in); err != nil {
			return err
		}
		// The installed copy carries the source's modification time, which
		// is how the next sync knows it is up to date without reading it.
		return os.Chtimes(f.Name(), si.ModTime(), si.ModTime())
	})
	return err == nil, err
}

func renameSynced(tmp, dst string) error {
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(dst))
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
