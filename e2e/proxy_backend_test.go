package e2e

import (
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
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
	client := &http.Client{Timeout: 2 * time.Second}
	for _, n := range c.Nodes {
		resp, err := client.Get(n.HealthURL() + "/metrics")
		if err != nil {
			t.Fatalf("%s: %v", n.Name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var line string
		for _, l := range strings.Split(string(body), "\n") {
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
