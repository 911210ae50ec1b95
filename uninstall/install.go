package uninstall

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/internal/atomicfile"
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
	if _, err := atomicfile.CopyExecutable(src, dst); err != nil {
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
		tmp := atomicfile.TempName(p)
		os.Remove(tmp)
		if err := os.Symlink(plugin.PluginType, tmp); err != nil {
			return err
		}
		if err := atomicfile.Rename(tmp, p); err != nil {
			return err
		}
	}
	return nil
}
