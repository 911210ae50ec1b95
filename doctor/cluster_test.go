package doctor

import (
	"net/netip"
	"strings"
	"testing"

	"knit.dev/knit/status"
)

func TestReach(t *testing.T) {
	local := []netip.Addr{netip.MustParseAddr("198.18.0.2")}
	tests := []struct {
		name, healthAddr, nodeIP string
		port                     int
		wantURL, wantWhy         string
	}{
		{"wildcard: the node's InternalIP", "0.0.0.0:9940", "198.18.0.1", 0, "http://198.18.0.1:9940", ""},
		{"IPv6 wildcard", "[::]:9941", "fd00::1", 0, "http://[fd00::1]:9941", ""},
		{"bound to the node's address", "198.18.0.1:9940", "198.18.0.1", 0, "http://198.18.0.1:9940", ""},
		{"loopback on another node", "127.0.0.1:9940", "198.18.0.1", 0, "", "listens on 127.0.0.1:9940 only"},
		{"loopback on this node", "127.0.0.1:9940", "198.18.0.2", 0, "http://127.0.0.1:9940", ""},
		{"no summary: the default port on the node IP", "", "198.18.0.3", 9999, "http://198.18.0.3:9999", ""},
		{"wildcard without a node IP", "0.0.0.0:9940", "", 0, "", "no InternalIP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := &Env{StatusNamespace: "knit-system", AgentPort: tt.port}
			ni := &NodeInfo{Name: "n", IP: tt.nodeIP}
			if tt.healthAddr != "" {
				ni.Summary = &status.Summary{HealthAddr: tt.healthAddr}
			}
			env.reach(ni, local)
			if ni.URL != tt.wantURL || (tt.wantWhy != "" && !strings.Contains(ni.Unreachable, tt.wantWhy)) {
				t.Errorf("URL %q, unreachable %q; want %q, %q", ni.URL, ni.Unreachable, tt.wantURL, tt.wantWhy)
			}
		})
	}
}
