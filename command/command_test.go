package command

import (
	"bytes"
	"slices"
	"testing"
)

func TestDispatch(t *testing.T) {
	env := func(m map[string]string) func(string) string {
		return func(k string) string { return m[k] }
	}
	none := env(nil)
	tests := []struct {
		name string
		argv []string
		env  func(string) string
		want Role
	}{
		{"cli", []string{"/usr/bin/knit", "version"}, none, Role{Args: []string{"knit", "version"}}},
		{"cli no args", []string{"knit"}, none, Role{Args: []string{"knit"}}},
		{"empty argv", nil, none, Role{Args: []string{"knit"}}},
		{"agent symlink", []string{"/opt/knit/knit-agent", "--node-name", "n1"}, none,
			Role{Args: []string{"knit", "agent", "--node-name", "n1"}}},
		{"proxy symlink", []string{"knit-proxy"}, none, Role{Args: []string{"knit", "agent", "--components=proxy"}}},
		{"overlay symlink", []string{"./knit-overlay", "-x"}, none, Role{Args: []string{"knit", "agent", "--components=overlay", "-x"}}},
		{"dns symlink", []string{"knit-dns"}, none, Role{Args: []string{"knit", "agent", "--components=dns"}}},
		{"ingress symlink", []string{"knit-ingress"}, none, Role{Args: []string{"knit", "agent", "--components=ingress"}}},
		{"cni plugin", []string{"/opt/cni/bin/knit"}, env(map[string]string{"CNI_COMMAND": "ADD"}), Role{CNI: true}},
		{"cni wins over symlink", []string{"knit-proxy"}, env(map[string]string{"CNI_COMMAND": "VERSION"}), Role{CNI: true}},
		{"unknown name is the cli", []string{"something-else", "version"}, none, Role{Args: []string{"knit", "version"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Dispatch(tt.argv, tt.env)
			if got.CNI != tt.want.CNI || !slices.Equal(got.Args, tt.want.Args) {
				t.Errorf("Dispatch(%q) = %+v, want %+v", tt.argv, got, tt.want)
			}
		})
	}
}

func TestMainVersionAndErrors(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Main([]string{"knit", "version"}, nil, &out, &errb); code != 0 || !bytes.Contains(out.Bytes(), []byte("knit ")) {
		t.Fatalf("version: code %d, out %q, err %q", code, out.String(), errb.String())
	}
	out.Reset()
	errb.Reset()
	code := Main([]string{"knit-agent", "--components", "bogus", "--node-name", "n1"}, nil, &out, &errb)
	if code == 0 || !bytes.Contains(errb.Bytes(), []byte(`unknown component "bogus"`)) {
		t.Fatalf("bad --components: code %d, stderr %q", code, errb.String())
	}
}
