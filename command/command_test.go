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

func TestDoctorAndStatusArgs(t *testing.T) {
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"knit", "doctor"}, 2, "usage: knit doctor <namespace>/<service>"},
		{[]string{"knit", "doctor", "ns/svc", "--from", "vm/x", "--kubeconfig", "/nonexistent"}, 2, `--from "vm/x"`},
		{[]string{"knit", "status", "--kubeconfig", "/nonexistent"}, 1, "kubeconfig"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		code := Main(tt.args, nil, &out, &errb)
		if code != tt.code || !bytes.Contains(errb.Bytes(), []byte(tt.want)) {
			t.Errorf("%v: code %d, stderr %q; want %d and %q", tt.args, code, errb.String(), tt.code, tt.want)
		}
	}
}

func TestFlagsFirst(t *testing.T) {
	tests := []struct{ in, want []string }{
		{[]string{"knit", "doctor", "ns/svc", "--from", "node/n1", "-o", "json"}, []string{"knit", "doctor", "--from", "node/n1", "-o", "json", "ns/svc"}},
		{[]string{"knit", "doctor", "-o=json", "ns/svc"}, []string{"knit", "doctor", "-o=json", "ns/svc"}},
		{[]string{"knit", "doctor", "ns/svc", "--help"}, []string{"knit", "doctor", "--help", "ns/svc"}},
		{[]string{"knit", "status", "x", "-o", "json"}, []string{"knit", "status", "x", "-o", "json"}},
	}
	for _, tt := range tests {
		if got := flagsFirst(tt.in); !slices.Equal(got, tt.want) {
			t.Errorf("flagsFirst(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
