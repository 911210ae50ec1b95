package plugin

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"knit.dev/knit/cni/hostport"
)

var update = flag.Bool("update", false, "rewrite golden files")

// run calls the dispatcher in process without any node: for failures that
// happen before the kernel is touched. scratch replaces the default run and
// state dirs, so that no test or fuzz input reaches /run/knit or
// /var/lib/knit.
func run(scratch, cmd string, stdin string, env map[string]string) (string, int) {
	var out bytes.Buffer
	p := &plugin{stdout: &out, stderr: io.Discard, bootIDPath: "/nonexistent", now: time.Now, newNFT: hostport.New,
		defaultRunDir: filepath.Join(scratch, "run"), defaultStateDir: filepath.Join(scratch, "state")}
	e := map[string]string{"CNI_COMMAND": cmd}
	for k, v := range env {
		e[k] = v
	}
	code := p.main(strings.NewReader(stdin), func(k string) string { return e[k] })
	return out.String(), code
}

func TestErrorsNameTheFieldOrCondition(t *testing.T) {
	addEnv := map[string]string{"CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0"}
	noNode := `"runDir":"/nonexistent/run","stateDir":"` + t.TempDir() + `"`
	for _, tc := range []struct {
		name, cmd, stdin string
		env              map[string]string
		code             uint
		msg              string
		cniVersion       string
	}{
		{"no command", "", `{}`, nil, types.ErrInvalidEnvironmentVariables, "CNI_COMMAND: not set", "1.1.0"},
		{"unknown command", "FROB", `{}`, nil, types.ErrInvalidEnvironmentVariables, `CNI_COMMAND: unknown command "FROB"`, "1.1.0"},
		{"missing env", "ADD", `{}`, map[string]string{"CNI_IFNAME": "eth0"}, types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID, CNI_NETNS: required for ADD", "1.1.0"},
		{"bad container id", "DEL", `{}`, map[string]string{"CNI_CONTAINERID": "-x", "CNI_IFNAME": "eth0"}, types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID", "1.1.0"},
		{"bad ifname", "DEL", `{}`, map[string]string{"CNI_CONTAINERID": "c", "CNI_IFNAME": "a/b"}, types.ErrInvalidEnvironmentVariables, "CNI_IFNAME", "1.1.0"},
		{"bad json", "ADD", `{"cniVersion":`, addEnv, types.ErrDecodingFailure, "invalid network configuration JSON", "1.1.0"},
		{"no name", "ADD", `{"cniVersion":"1.0.0"}`, addEnv, types.ErrInvalidNetworkConfig, "name: missing", "1.1.0"},
		{"bad name", "ADD", `{"cniVersion":"1.0.0","name":"a b"}`, addEnv, types.ErrInvalidNetworkConfig, "name: invalid", "1.1.0"},
		{"no version", "ADD", `{"name":"knit"}`, addEnv, types.ErrIncompatibleCNIVersion, "cniVersion: missing", "1.1.0"},
		{"unknown version", "ADD", `{"cniVersion":"0.2.0","name":"knit"}`, addEnv, types.ErrIncompatibleCNIVersion, `cniVersion: "0.2.0" is not supported`, "1.1.0"},
		{"future version", "ADD", `{"cniVersion":"9.0.0","name":"knit"}`, addEnv, types.ErrIncompatibleCNIVersion, `cniVersion: "9.0.0"`, "1.1.0"},
		{"ipam section", "ADD", `{"cniVersion":"1.0.0","name":"knit","ipam":{"type":"host-local"}}`, addEnv, types.ErrUnsupportedField, `ipam: type "host-local"`, "1.1.0"},
		{"relative runDir", "ADD", `{"cniVersion":"1.0.0","name":"knit","runDir":"run"}`, addEnv, types.ErrInvalidNetworkConfig, "runDir", "1.1.0"},
		{"bad hostPort", "ADD", `{"cniVersion":"1.0.0","name":"knit","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80},{"hostPort":70000,"containerPort":80}]}}`, addEnv, types.ErrInvalidNetworkConfig, "runtimeConfig.portMappings[1].hostPort: 70000", "1.1.0"},
		{"bad protocol", "ADD", `{"cniVersion":"1.0.0","name":"knit","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"icmp"}]}}`, addEnv, types.ErrInvalidNetworkConfig, "runtimeConfig.portMappings[0].protocol", "1.1.0"},
		{"bad hostIP", "ADD", `{"cniVersion":"1.0.0","name":"knit","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"hostIP":"nope"}]}}`, addEnv, types.ErrInvalidNetworkConfig, "runtimeConfig.portMappings[0].hostIP", "1.1.0"},
		{"duplicate hostPort", "ADD", `{"cniVersion":"1.0.0","name":"knit","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80},{"hostPort":80,"containerPort":81,"protocol":"TCP"}]}}`, addEnv, types.ErrInvalidNetworkConfig, "mapped twice", "1.1.0"},
		{"netns missing", "ADD", `{"cniVersion":"1.0.0","name":"knit",` + noNode + `}`, addEnv, types.ErrInvalidNetNS, "CNI_NETNS", "1.0.0"},
		{"check too old", "CHECK", `{"cniVersion":"0.3.1","name":"knit"}`, addEnv, types.ErrIncompatibleCNIVersion, "CHECK needs 0.4.0", "1.1.0"},
		{"status no node", "STATUS", `{"cniVersion":"1.1.0","name":"knit",` + noNode + `}`, nil, types.ErrPluginNotAvailable, "node.json does not exist", "1.1.0"},
		{"check no prevResult", "CHECK", `{"cniVersion":"1.1.0","name":"knit","runDir":"` + nodeDir(t) + `","stateDir":"/nonexistent"}`, addEnv, types.ErrInvalidNetworkConfig, "prevResult: missing", "1.1.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := run(t.TempDir(), tc.cmd, tc.stdin, tc.env)
			if code != 1 {
				t.Fatalf("exit %d, want 1: %s", code, out)
			}
			var e struct {
				CNIVersion string `json:"cniVersion"`
				Code       uint   `json:"code"`
				Msg        string `json:"msg"`
			}
			if err := json.Unmarshal([]byte(out), &e); err != nil {
				t.Fatalf("stdout is not an error object: %q", out)
			}
			if e.Code != tc.code || !strings.Contains(e.Msg, tc.msg) || e.CNIVersion != tc.cniVersion {
				t.Fatalf("got %+v, want code %d, cniVersion %s, msg containing %q", e, tc.code, tc.cniVersion, tc.msg)
			}
		})
	}
}

// nodeDir is a run dir holding a valid node.json.
func nodeDir(t *testing.T) string {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "cni"), 0o755)
	os.WriteFile(NodeConfigPath(dir), []byte(`{"podCIDRs":["10.42.1.0/24"],"mtu":1450,"bridge":"cni0","hairpin":true}`), 0o644)
	return dir
}

func TestVersion(t *testing.T) {
	out, code := run(t.TempDir(), "VERSION", "", nil)
	if code != 0 || out != `{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}`+"\n" {
		t.Fatalf("VERSION: %d %s", code, out)
	}
}

func TestParseNodeConfig(t *testing.T) {
	for _, tc := range []struct{ doc, err string }{
		{`{"podCIDRs":["10.42.1.0/24","fd42:0:0:1::/64"],"mtu":1450,"bridge":"cni0"}`, ""},
		{`{"podCIDRs":[],"mtu":1450,"bridge":"cni0"}`, "podCIDRs: empty"},
		{`{"podCIDRs":["10.42.1.0/24","10.42.2.0/24"],"mtu":1450,"bridge":"cni0"}`, "same IP family"},
		{`{"podCIDRs":["10.42.1.0/31"],"mtu":1450,"bridge":"cni0"}`, "podCIDRs[0]"},
		{`{"podCIDRs":["fd42::/64"],"mtu":1000,"bridge":"cni0"}`, "mtu: 1000 out of range 1280"},
		{`{"podCIDRs":["10.42.1.0/24"],"mtu":1450,"bridge":"a-very-long-bridge-name"}`, "bridge:"},
		{`{"podCIDRs":["10.42.1.0/24"],"mtu":"x"}`, "node.json"},
	} {
		_, err := ParseNodeConfig([]byte(tc.doc), "node.json")
		if (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%s: err %v, want %q", tc.doc, err, tc.err)
		}
	}
}

func TestPodArgs(t *testing.T) {
	p, err := podArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1-2-3")
	if err != nil || p.Namespace != "kube-system" || p.Name != "coredns-1" || p.UID != "1-2-3" {
		t.Fatalf("%+v %v", p, err)
	}
	if _, err := podArgs("K8S_POD_NAME"); err == nil {
		t.Fatal("malformed CNI_ARGS accepted")
	}
}

func TestHostVethName(t *testing.T) {
	a, b := HostVethName("0123456789abcdef", "eth0"), HostVethName("0123456789abcdef", "eth1")
	if len(a) != 15 || !strings.HasPrefix(a, "knv") || a == b || a != HostVethName("0123456789abcdef", "eth0") {
		t.Fatalf("%q %q", a, b)
	}
}

// TestResultGolden pins the result JSON a runtime (and any chained plugin,
// as prevResult) sees, for every supported config version.
func TestResultGolden(t *testing.T) {
	node := &NodeConfig{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24"), netip.MustParsePrefix("fd42:0:0:1::/64")}, MTU: 1450, Bridge: "cni0"}
	pl := &podLink{bridgeName: "cni0", bridgeMAC: "02:42:ac:11:00:01", hostName: HostVethName("c0ffee", "eth0"), hostMAC: "36:9a:1b:2c:3d:4e",
		podName: "eth0", podMAC: podMAC([]netip.Addr{netip.MustParseAddr("10.42.1.7")}).String()}
	ips := []netip.Addr{netip.MustParseAddr("10.42.1.7"), netip.MustParseAddr("fd42:0:0:1::7")}
	dns := types.DNS{Nameservers: []string{"10.43.0.10"}, Search: []string{"default.svc.cluster.local", "svc.cluster.local", "cluster.local"}, Options: []string{"ndots:5"}}
	for _, ver := range SupportedVersions {
		t.Run(ver, func(t *testing.T) {
			res, err := buildResult(node, pl, "/run/netns/cni-1234", ips, dns).GetAsVersion(ver)
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if err := res.PrintTo(&buf); err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", "golden", "result-"+ver+".json")
			if *update {
				os.MkdirAll(filepath.Dir(golden), 0o755)
				os.WriteFile(golden, buf.Bytes(), 0o644)
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if !bytes.Equal(buf.Bytes(), want) {
				t.Fatalf("result differs from %s:\n%s", golden, buf.String())
			}
		})
	}
}

// FuzzNetConf feeds arbitrary configurations and CNI_ARGS through the
// dispatcher's parsing: it must answer with a result or an error object,
// never panic. The netns path never exists, so nothing reaches the kernel.
func FuzzNetConf(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"knit","type":"knit","capabilities":{"portMappings":true},"runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}}`), "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", "ADD")
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"knit","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}`), "", "GC")
	f.Add([]byte(`{"cniVersion":"0.4.0","name":"knit","prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"version":"4","address":"10.0.0.2/24","interface":0}]}}`), "", "CHECK")
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"knit","dns":{"nameservers":["10.43.0.10"]}}`), "IgnoreUnknown=1", "DEL")
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"knit"}`), "", "STATUS")
	scratch := f.TempDir()
	f.Fuzz(func(t *testing.T, stdin []byte, args, cmd string) {
		switch cmd {
		case "ADD", "CHECK", "GC", "STATUS", "VERSION":
		default:
			return // DEL would touch the kernel and the state dir
		}
		env := map[string]string{"CNI_CONTAINERID": "fuzz", "CNI_NETNS": "/nonexistent/netns", "CNI_IFNAME": "eth0", "CNI_ARGS": args}
		if bytes.Contains(stdin, []byte("Dir")) {
			return // keep the fuzzer in the scratch directories
		}
		out, code := run(scratch, cmd, string(stdin), env)
		if code != 0 && !json.Valid([]byte(out)) {
			t.Fatalf("exit %d without an error object: %q", code, out)
		}
	})
}
