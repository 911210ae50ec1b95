package command

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestManifestGolden: `knit manifest` with no flags prints exactly the
// checked-in deploy/knit.yaml, so the flag defaults cannot drift from it.
func TestManifestGolden(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Main([]string{"knit", "manifest"}, nil, &out, &errb); code != 0 {
		t.Fatalf("knit manifest: exit %d: %s", code, errb.String())
	}
	want, err := os.ReadFile("../deploy/knit.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Error("`knit manifest` differs from deploy/knit.yaml; regenerate it with `make manifest`")
	}
}

func TestManifestFlags(t *testing.T) {
	var out, errb bytes.Buffer
	code := Main([]string{"knit", "manifest", "--cluster-dns", "10.96.0.10", "--service-cidr", "10.96.0.0/12",
		"--image", "registry.example/knit:v1", "--namespace", "net", "--apiserver", "192.0.2.1:6443"}, nil, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, s := range []string{"clusterIP: 10.96.0.10", "image: registry.example/knit:v1", "namespace: net", "value: 192.0.2.1"} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("output lacks %q", s)
		}
	}
	out.Reset()
	errb.Reset()
	if code := Main([]string{"knit", "manifest", "--cluster-dns", "10.42.0.10"}, nil, &out, &errb); code == 0 ||
		!strings.Contains(errb.String(), "not in the service CIDR") {
		t.Errorf("DNS IP outside the service CIDR: exit %d, stderr %q", code, errb.String())
	}
}

// TestUninstallNeedsYes: without --yes nothing is removed, the plan is
// listed and the exit status is not 0. Plan only inspects (lists links,
// routes, nftables tables, files), so this is safe outside the sandbox; the
// file in a scratch conf dir makes sure there is something to refuse.
func TestUninstallNeedsYes(t *testing.T) {
	d := t.TempDir()
	conf := filepath.Join(d, "10-knit.conflist")
	if err := os.WriteFile(conf, []byte(`{"plugins":[{"type":"knit"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	code := Main([]string{"knit", "uninstall", "--run-dir", d, "--cni-conf-dir", d, "--cni-bin-dir", d}, nil, &out, &errb)
	if code == 0 || !strings.Contains(errb.String(), "without --yes") || !strings.Contains(out.String(), "file "+conf) {
		t.Errorf("uninstall without --yes: exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
	}
	if _, err := os.Stat(conf); err != nil {
		t.Errorf("uninstall without --yes removed %s", conf)
	}
}
