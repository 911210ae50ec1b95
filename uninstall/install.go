package uninstall

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"knit.dev/knit/cni/plugin"
)

// InstallBinary is the install side of the file list above, run by the
// DaemonSet's init container (`knit install-cni`): it copies src to
// <binDir>/knit, the CNI plugin the runtime runs, and makes each name in
// symlinks a symbolic link to it. The copy goes through a temporary file
// renamed over the old one, so a runtime executing the old plugin is never
// disturbed, and it keeps src's modification time, which is how the agent's
// own install step (cni/node) sees that the copy is current. Kept here so
// that what is installed and what Plan removes come from one list.
func InstallBinary(src, binDir string, symlinks []string) error {
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return err
	}
	si, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("binary to install: %w", err)
	}
	if !si.Mode().IsRegular() {
		return fmt.Errorf("binary to install: %s is not a regular file", src)
	}
	dst := filepath.Join(binDir, plugin.PluginType)
	if err := copyFile(src, dst, si); err != nil {
		return fmt.Errorf("install %s: %w", dst, err)
	}
	for _, name := range symlinks {
		p := filepath.Join(binDir, name)
		if target, err := os.Readlink(p); err == nil && target == plugin.PluginType {
			continue
		}
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&fs.ModeSymlink == 0 {
			return fmt.Errorf("%s exists and is not a symbolic link: not replacing it", p)
		}
		tmp := tmpPath(p)
		os.Remove(tmp)
		if err := os.Symlink(plugin.PluginType, tmp); err != nil {
			return err
		}
		if err := os.Rename(tmp, p); err != nil {
			os.Remove(tmp)
			return err
		}
	}
	return syncDir(binDir)
}

func copyFile(src, dst string, si fs.FileInfo) error {
	if di, err := os.Stat(dst); err == nil && di.Mode().IsRegular() &&
		di.Size() == si.Size() && di.ModTime().Equal(si.ModTime()) && di.Mode().Perm() == 0o755 &&
		sameContent(src, dst) {
		// Current. The contents are compared too, not only size and time
		// as cni/node does: images are built with fixed timestamps, so
		// two versions of the binary can agree on both.
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := tmpPath(dst)
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	err = out.Chmod(0o755)
	if err == nil {
		_, err = io.Copy(out, in)
	}
	if err == nil {
		err = out.Sync()
	}
	err = errors.Join(err, out.Close())
	if err == nil {
		err = os.Chtimes(tmp, si.ModTime(), si.ModTime())
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// sameContent reports whether the files at a and b have equal bytes.
func sameContent(a, b string) bool {
	fa, err := os.Open(a)
	if err != nil {
		return false
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return false
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for {
		na, erra := io.ReadFull(fa, ba)
		nb, errb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false
		}
		if erra != nil || errb != nil {
			return (erra == io.EOF || erra == io.ErrUnexpectedEOF) && (errb == io.EOF || errb == io.ErrUnexpectedEOF)
		}
	}
}
