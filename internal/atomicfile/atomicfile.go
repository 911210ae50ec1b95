// Package atomicfile replaces files the crash-safe way, for everything knit
// keeps on a node's disk: the CNI plugin's IPAM state, the node config and
// conflist the agent writes, and the plugin binary it installs.
//
// A file is never written in place: its new contents go to a temporary file
// in the same directory, which is synced and renamed over the old one, and
// the directory is synced. A reader (the plugin, a container runtime's
// config watcher, the next boot) sees the old or the new file, never a torn
// one, and a power cut leaves one of the two behind. The package depends on
// nothing but the standard library and x/sys, because the plugin-only
// knit-cni binary links it.
package atomicfile

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// TempName is the temporary file next to path that writes go through unless
// a caller names its own. It starts with a dot and ends in .knit-tmp, so
// neither libcni (which reads *.conf, *.conflist, *.json) nor the plugin ever
// reads a half-written one, and `knit uninstall` knows what to remove.
func TempName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".knit-tmp")
}

// Options tune a replacement. The zero value writes mode 0600 through
// TempName(path) and syncs file and directory.
type Options struct {
	Mode fs.FileMode // of the new file; 0 means 0600
	Temp string      // temporary file; "" means TempName(path)
	// NoSync skips fdatasync and the directory sync: the rename is still
	// atomic for readers, but a power cut may lose the update. Only for
	// state that a boot invalidates anyway (the IPAM store's reservations
	// of the current boot).
	NoSync bool
}

// Replace makes path the file that fill writes, atomically.
func Replace(path string, o Options, fill func(*os.File) error) error {
	mode := o.Mode
	if mode == 0 {
		mode = 0o600
	}
	tmp := o.Temp
	if tmp == "" {
		tmp = TempName(path)
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_CLOEXEC, mode)
	if err != nil {
		return err
	}
	err = f.Chmod(mode) // an older temporary file keeps its mode through O_CREATE
	if err == nil {
		err = fill(f)
	}
	if err == nil && !o.NoSync {
		// fdatasync also flushes the size of the freshly written file,
		// which is all a reader needs.
		err = unix.Fdatasync(int(f.Fd()))
	}
	err = errors.Join(err, f.Close())
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if o.NoSync {
		return nil
	}
	return SyncDir(filepath.Dir(path))
}

// Write makes path hold data, atomically.
func Write(path string, data []byte, o Options) error {
	return Replace(path, o, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	})
}

// WriteIfChanged makes path hold exactly data, creating its directory if
// needed, and writes only when it does not already. It reports whether it
// wrote.
func WriteIfChanged(path string, data []byte, o Options) (bool, error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	err := Write(path, data, o)
	return err == nil, err
}

// Rename renames tmp over dst and syncs dst's directory; tmp is removed if
// the rename fails.
func Rename(tmp, dst string) error {
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return SyncDir(filepath.Dir(dst))
}

// SyncDir makes a directory's entries (a rename, a new file) durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// CopyExecutable makes dst a copy of the regular file src with mode 0755 and
// src's modification time, atomically: a process executing the old dst is
// never disturbed. It copies only when dst differs from src in size, mode or
// contents (not time alone: images are built with fixed timestamps, so two
// versions of a binary can agree on size and time). It reports whether it
// copied.
func CopyExecutable(src, dst string) (bool, error) {
	si, err := os.Stat(src)
	if err != nil {
		return false, err
	}
	if !si.Mode().IsRegular() {
		return false, &fs.PathError{Op: "copy", Path: src, Err: errors.New("not a regular file")}
	}
	if di, err := os.Lstat(dst); err == nil && di.Mode().IsRegular() && di.Mode().Perm() == 0o755 &&
		(os.SameFile(si, di) || (di.Size() == si.Size() && SameContent(src, dst))) {
		return false, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return false, err
	}
	defer in.Close()
	err = Replace(dst, Options{Mode: 0o755}, func(f *os.File) error {
		if _, err := io.Copy(f, in); err != nil {
			return err
		}
		return os.Chtimes(f.Name(), si.ModTime(), si.ModTime())
	})
	return err == nil, err
}

// SameContent reports whether the files at a and b hold equal bytes.
func SameContent(a, b string) bool {
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
			return isEOF(erra) && isEOF(errb)
		}
	}
}

func isEOF(err error) bool { return err == io.EOF || err == io.ErrUnexpectedEOF }
