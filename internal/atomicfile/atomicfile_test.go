package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestWriteIfChanged(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "10-knit.conflist")
	for _, c := range []struct {
		name      string
		data      string
		wantWrote bool
	}{
		{"creates file and directory", "one", true},
		{"same bytes: no write", "one", false},
		{"new bytes: replaced", "two", true},
		{"empty is contents too", "", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			wrote, err := WriteIfChanged(path, []byte(c.data), Options{Mode: 0o644})
			if err != nil {
				t.Fatal(err)
			}
			if wrote != c.wantWrote {
				t.Errorf("wrote = %v, want %v", wrote, c.wantWrote)
			}
			got, err := os.ReadFile(path)
			if err != nil || string(got) != c.data {
				t.Fatalf("file = %q, %v; want %q", got, err, c.data)
			}
			fi, _ := os.Stat(path)
			if fi.Mode().Perm() != 0o644 {
				t.Errorf("mode %v, want 0644", fi.Mode().Perm())
			}
			if _, err := os.Stat(TempName(path)); !os.IsNotExist(err) {
				t.Errorf("temporary file left behind: %v", err)
			}
		})
	}
}

func TestReplaceFailureKeepsOldFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	if err := Write(path, []byte("old"), Options{Temp: path + ".tmp", NoSync: true}); err != nil {
		t.Fatal(err)
	}
	err := Replace(path, Options{Temp: path + ".tmp"}, func(f *os.File) error {
		f.Write([]byte("half"))
		return os.ErrInvalid
	})
	if err == nil {
		t.Fatal("no error from a failing fill")
	}
	if got, _ := os.ReadFile(path); string(got) != "old" {
		t.Errorf("after a failed replace the file holds %q, want the old contents", got)
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("default mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestCopyExecutable(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "knit-cni"), filepath.Join(dir, "bin", "knit")
	os.MkdirAll(filepath.Dir(dst), 0o755)
	stamp := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC) // images have fixed times
	put := func(data string) {
		t.Helper()
		if err := os.WriteFile(src, []byte(data), 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chtimes(src, stamp, stamp)
	}
	for _, c := range []struct {
		name       string
		src        string
		before     func()
		wantCopied bool
	}{
		{"first install", "binary-v1", nil, true},
		{"unchanged: no copy", "binary-v1", nil, false},
		{"same size and time, other bytes: copied", "binary-v2", nil, true},
		{"mode changed by someone: copied", "binary-v2", func() { os.Chmod(dst, 0o700) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			put(c.src)
			if c.before != nil {
				c.before()
			}
			copied, err := CopyExecutable(src, dst)
			if err != nil {
				t.Fatal(err)
			}
			if copied != c.wantCopied {
				t.Errorf("copied = %v, want %v", copied, c.wantCopied)
			}
			got, _ := os.ReadFile(dst)
			fi, _ := os.Stat(dst)
			if string(got) != c.src || fi.Mode().Perm() != 0o755 || !fi.ModTime().Equal(stamp) {
				t.Errorf("dst = %q mode %v time %v; want %q 0755 %v", got, fi.Mode().Perm(), fi.ModTime(), c.src, stamp)
			}
		})
	}
	if _, err := CopyExecutable(filepath.Join(dir, "missing"), dst); err == nil {
		t.Error("no error for a missing source")
	}
	if _, err := CopyExecutable(dir, dst); err == nil {
		t.Error("no error for a directory as source")
	}
}

func TestSameContent(t *testing.T) {
	dir := t.TempDir()
	w := func(name string, n int, last byte) string {
		p := filepath.Join(dir, name)
		b := make([]byte, n)
		if n > 0 {
			b[n-1] = last
		}
		os.WriteFile(p, b, 0o644)
		return p
	}
	big := 3<<20 + 7 // crosses the 1 MiB read buffer
	for _, c := range []struct {
		name string
		a, b string
		want bool
	}{
		{"equal large", w("a", big, 1), w("b", big, 1), true},
		{"last byte differs", w("c", big, 1), w("d", big, 2), false},
		{"length differs", w("e", big, 1), w("f", big+1, 1), false},
		{"both empty", w("g", 0, 0), w("h", 0, 0), true},
		{"missing file", w("i", 1, 0), filepath.Join(dir, "nope"), false},
	} {
		if got := SameContent(c.a, c.b); got != c.want {
			t.Errorf("%s: SameContent = %v, want %v", c.name, got, c.want)
		}
	}
}
