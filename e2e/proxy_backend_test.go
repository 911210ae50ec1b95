package e2e

import (
	"os"
	"strings"
	"testing"
)

// TestProxyBackend checks that every agent's proxy runs the backend the run
// asked for (KNIT_LAB_PROXY_BACKEND; default auto, which is nftables in the
// lab), so that a run meant for the iptables backend cannot silently test
// nftables.
func TestProxyBackend(t *testing.T) {
	c := cluster(t)
	want := os.Getenv("KNIT_LAB_PROXY_BACKEND")
	switch want {
	case "", "auto":
		want = `backend="nftables"`
	case "iptables":
		want = `backend="iptables-`
	default:
		want = `backend="` + want + `"`
	}
	for _, n := range c.Nodes {
		var line string
		for _, l := range strings.Split(agentMetrics(t, n), "\n") {
			if strings.HasPrefix(l, "knit_proxy_backend_info{") {
				line = l
			}
			if l == "knit_proxy_iptables_mismatch 1" {
				t.Errorf("%s reports an iptables-legacy/iptables-nft mismatch in the lab", n.Name)
			}
		}
		if !strings.Contains(line, want) {
			t.Errorf("%s: proxy backend metric %q, want %s", n.Name, line, want)
		}
	}
}
