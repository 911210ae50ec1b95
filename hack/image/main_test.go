package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func entries(t *testing.T, r io.Reader) []string {
	t.Helper()
	var names []string
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
}

// TestBinaryLayerIsReproducible: the same binary gives the same layer
// digest, whatever the file's own time, and knit and knit-cni sit where the
// manifest and install-cni expect them.
func TestBinaryLayerIsReproducible(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "knit")
	if err := os.WriteFile(bin, []byte("binary"), 0o700); err != nil {
		t.Fatal(err)
	}
	epoch := time.Unix(0, 0)
	files := map[string]string{binaryPath: bin, pluginPath: bin}
	l1, err := binaryLayer(files, epoch)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(bin, time.Now(), time.Now()); err != nil {
		t.Fatal(err)
	}
	l2, _ := binaryLayer(files, epoch)
	d1, _ := l1.Digest()
	d2, _ := l2.Digest()
	if d1 != d2 {
		t.Errorf("digests differ: %s, %s", d1, d2)
	}
	rc, _ := l1.Uncompressed()
	defer rc.Close()
	if got := entries(t, rc); !slices.Equal(got, []string{"usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/knit", "usr/local/bin/knit-cni"}) {
		t.Errorf("layer entries %v", got)
	}
}

// TestCopyDebFiles: package paths become relative, docs are dropped,
// directories shared by packages appear once, owners are root.
func TestCopyDebFiles(t *testing.T) {
	mk := func(files ...string) *tar.Reader {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		for _, f := range files {
			h := &tar.Header{Name: f, Mode: 0o644, Typeflag: tar.TypeReg, Uid: 1000, Gname: "staff"}
			if f[len(f)-1] == '/' {
				h.Typeflag, h.Mode = tar.TypeDir, 0o755
			}
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
		}
		tw.Close()
		return tar.NewReader(&b)
	}
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	seen := map[string]bool{}
	if err := copyDebFiles(tw, mk("./", "./usr/", "./usr/sbin/", "./usr/sbin/nft", "./usr/share/doc/", "./usr/share/doc/nftables/copyright"), seen); err != nil {
		t.Fatal(err)
	}
	if err := copyDebFiles(tw, mk("./", "./usr/", "./usr/lib/", "./usr/lib/libnftables.so.1", "./usr/share/man/man8/nft.8.gz"), seen); err != nil {
		t.Fatal(err)
	}
	tw.Close()
	want := []string{"usr/", "usr/sbin/", "usr/sbin/nft", "usr/lib/", "usr/lib/libnftables.so.1"}
	if got := entries(t, bytes.NewReader(out.Bytes())); !slices.Equal(got, want) {
		t.Errorf("entries %v, want %v", got, want)
	}
	tr := tar.NewReader(bytes.NewReader(out.Bytes()))
	for h, err := tr.Next(); err == nil; h, err = tr.Next() {
		if h.Uid != 0 || h.Gname != "root" {
			t.Errorf("%s owned by %d/%s", h.Name, h.Uid, h.Gname)
		}
	}
}
