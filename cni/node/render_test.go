package node

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	corev1 "k8s.io/api/core/v1"

	"knit.dev/knit/cni/plugin"
)

func TestRender(t *testing.T) {
	cfg, err := Config{NodeName: "n1", ClusterCIDRs: []netip.Prefix{pfx("10.42.0.0/16"), pfx("fd42::/56")},
		ServiceCIDRs: []netip.Prefix{pfx("10.43.0.0/16")}}.normalize()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		node     *corev1.Node
		mtu      int
		wantWait string // substring
		wantErr  string // substring
		wantNode string // node.json, exact
	}{
		{name: "no Node object", node: nil, mtu: 1450, wantWait: "Node object n1"},
		{name: "no podCIDR yet", node: testNode("n1"), mtu: 1450, wantWait: "a podCIDR"},
		{name: "MTU not known yet", node: testNode("n1", "10.42.1.0/24"), mtu: 0, wantWait: "pod MTU"},
		{name: "bad podCIDR", node: testNode("n1", "10.42.1.0/33"), mtu: 1450, wantErr: `podCIDR "10.42.1.0/33"`},
		{name: "host bits set", node: testNode("n1", "10.42.1.7/24"), mtu: 1450, wantErr: "host bits"},
		{name: "two IPv4 podCIDRs", node: testNode("n1", "10.42.1.0/24", "10.42.2.0/24"), mtu: 1450, wantErr: "same IP family"},
		{name: "MTU too small for IPv6", node: testNode("n1", "10.42.1.0/24", "fd42:0:0:1::/64"), mtu: 1200, wantErr: "mtu: 1200"},
		{
			name: "IPv4", node: testNode("n1", "10.42.1.0/24"), mtu: 1450,
			wantNode: `{
  "podCIDRs": [
    "10.42.1.0/24"
  ],
  "mtu": 1450,
  "bridge": "cni0",
  "clusterCIDRs": [
    "10.42.0.0/16",
    "fd42::/56"
  ],
  "serviceCIDRs": [
    "10.43.0.0/16"
  ],
  "hairpin": true
}
`,
		},
		{
			// Only the old single-value field set (clusters before dual-stack).
			name: "spec.podCIDR only", node: &corev1.Node{Spec: corev1.NodeSpec{PodCIDR: "10.42.9.0/24"}}, mtu: 1500,
			wantNode: `"podCIDRs": [
    "10.42.9.0/24"
  ],
  "mtu": 1500,`,
		},
		{
			name: "dual-stack, IPv6 first", node: testNode("n1", "fd42:0:0:1::/64", "10.42.1.0/24"), mtu: 1430,
			wantNode: `"podCIDRs": [
    "fd42:0:0:1::/64",
    "10.42.1.0/24"
  ],
  "mtu": 1430,`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, wait, err := render(&cfg, tc.node, tc.mtu)
			switch {
			case tc.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want it to contain %q", err, tc.wantErr)
				}
				return
			case err != nil:
				t.Fatal(err)
			case tc.wantWait != "":
				if d != nil || !strings.Contains(wait, tc.wantWait) {
					t.Fatalf("wait %q (d %v), want %q", wait, d, tc.wantWait)
				}
				return
			case wait != "":
				t.Fatalf("waiting for %s", wait)
			}
			if !strings.Contains(string(d.nodeJSON), tc.wantNode) {
				t.Fatalf("node.json:\n%s\nwant it to contain:\n%s", d.nodeJSON, tc.wantNode)
			}
			// What the agent writes is what the plugin accepts.
			if _, err := plugin.ParseNodeConfig(d.nodeJSON, "node.json"); err != nil {
				t.Fatalf("plugin rejects node.json: %v", err)
			}
		})
	}
}

func TestConfList(t *testing.T) {
	cfg, _ := Config{NodeName: "n1", RunDir: "/run/lab/n1", StateDir: "/var/lib/lab/n1"}.normalize()
	got := string(renderConfList(&cfg))
	want := `{
  "cniVersion": "1.1.0",
  "name": "knit",
  "plugins": [
    {
      "type": "knit",
      "runDir": "/run/lab/n1",
      "stateDir": "/var/lib/lab/n1",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
`
	if got != want {
		t.Fatalf("conflist:\n%s\nwant:\n%s", got, want)
	}
	// libcni, as the runtime loads it.
	cl, err := libcni.ConfListFromBytes([]byte(got))
	if err != nil {
		t.Fatal(err)
	}
	if cl.CNIVersion != "1.1.0" || cl.Name != "knit" || len(cl.Plugins) != 1 || cl.Plugins[0].Network.Type != "knit" ||
		!cl.Plugins[0].Network.Capabilities["portMappings"] {
		t.Fatalf("libcni read %+v", cl)
	}
}

func TestSysctls(t *testing.T) {
	paths := func(ss []sysctl) string {
		var out []string
		for _, s := range ss {
			opt := ""
			if s.optional {
				opt = "?"
			}
			out = append(out, s.path+"="+s.value+opt)
		}
		return strings.Join(out, " ")
	}
	for _, tc := range []struct {
		name  string
		cidrs []netip.Prefix
		want  string
	}{
		{"IPv4 only: IPv6 forwarding left alone", []netip.Prefix{pfx("10.42.1.0/24")},
			"net/ipv4/ip_forward=1 net/ipv4/conf/all/send_redirects=0 net/ipv4/conf/cni0/send_redirects=0 net/bridge/bridge-nf-call-iptables=1?"},
		{"IPv6 only", []netip.Prefix{pfx("fd42:0:0:1::/64")},
			"net/ipv6/conf/all/forwarding=1 net/ipv6/conf/cni0/accept_ra=0 net/bridge/bridge-nf-call-ip6tables=1?"},
		{"dual-stack", []netip.Prefix{pfx("10.42.1.0/24"), pfx("fd42:0:0:1::/64")},
			"net/ipv4/ip_forward=1 net/ipv4/conf/all/send_redirects=0 net/ipv4/conf/cni0/send_redirects=0 net/bridge/bridge-nf-call-iptables=1? " +
				"net/ipv6/conf/all/forwarding=1 net/ipv6/conf/cni0/accept_ra=0 net/bridge/bridge-nf-call-ip6tables=1?"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := paths(sysctls("cni0", tc.cidrs)); got != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

func TestOwnedGateway(t *testing.T) {
	cluster := []netip.Prefix{pfx("10.42.0.0/16"), pfx("fd42::/56")}
	previous := []netip.Prefix{pfx("192.168.50.0/24")} // a podCIDR this node had
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"10.42.1.1/24", true},        // gateway of a podCIDR inside the cluster CIDR
		{"fd42:0:0:7::1/64", true},    // same, IPv6
		{"10.42.1.129/25", true},      // gateway of 10.42.1.128/25
		{"10.42.0.1/16", true},        // the whole cluster CIDR as one podCIDR
		{"192.168.50.1/24", true},     // gateway of an earlier podCIDR outside today's cluster CIDRs
		{"192.168.50.1/25", false},    // same address, another prefix: not what knit wrote
		{"10.42.1.5/24", false},       // not a gateway address
		{"10.42.1.0/24", false},       // the network address
		{"10.42.1.1/16", false},       // 10.42.0.0/16's gateway is 10.42.0.1
		{"10.42.0.1/15", false},       // wider than the cluster CIDR
		{"fd42:0:0:100::1/64", false}, // outside fd42::/56
		{"10.43.0.1/24", false},       // service CIDR
		{"192.168.1.1/24", false},     // someone else's network
		{"fe80::1/64", false},         // link-local
	} {
		if got := ownedGateway(pfx(tc.addr), cluster, previous); got != tc.want {
			t.Errorf("ownedGateway(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}
}

func TestConfigNormalize(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cfg     Config
		wantErr string
		check   func(Config) error
	}{
		{name: "node name required", cfg: Config{}, wantErr: "node name"},
		{name: "defaults", cfg: Config{NodeName: "n1"}, check: func(c Config) error {
			if c.RunDir != "/run/knit" || c.StateDir != "/var/lib/knit" || c.ConfDir != "/etc/cni/net.d" || c.BinDir != "/opt/cni/bin" ||
				c.Bridge != "cni0" || c.ConfName != "10-knit.conflist" || c.Install != InstallCopy ||
				c.SyncPeriod != DefaultSyncPeriod || c.ReconcilePeriod != DefaultReconcilePeriod || c.ReleaseGrace != DefaultReleaseGrace {
				return fmt.Errorf("defaults not applied: %+v", c)
			}
			return nil
		}},
		{name: "relative run dir", cfg: Config{NodeName: "n1", RunDir: "run"}, wantErr: "RunDir"},
		{name: "relative binary", cfg: Config{NodeName: "n1", BinaryPath: "knit"}, wantErr: "BinaryPath"},
		{name: "bad install mode", cfg: Config{NodeName: "n1", Install: "rsync"}, wantErr: "Install"},
		{name: "bad bridge name", cfg: Config{NodeName: "n1", Bridge: "a-bridge-name-too-long"}, wantErr: "Bridge"},
		{name: "conf name with a slash", cfg: Config{NodeName: "n1", ConfName: "../10-knit.conflist"}, wantErr: "ConfName"},
		{name: "conf name not a conflist", cfg: Config{NodeName: "n1", ConfName: "10-knit.conf"}, wantErr: "ConfName"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.cfg.normalize()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				if err := tc.check(c); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
