// Package e2e holds knit's end-to-end tests: a real control plane, nodes as
// network namespaces, knit as the network, all inside a private sandbox that
// TestMain creates (the test binary re-executes itself under unshare).
//
// One lab cluster is shared by the tests of a run and made on first use.
// Tests create their own namespaces so that they do not see each other's
// objects. KNIT_SKIP_E2E=1 skips them all; KNIT_LAB_CNI=reference runs them
// on the reference bridge + host-local plugins instead of knit's own;
// KNIT_LAB_PROXY_BACKEND=iptables (or iptables-legacy, iptables-nft,
// nftables) passes --proxy-backend to every agent.
package e2e

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/sandbox"
)

func TestMain(m *testing.M) {
	sandbox.Main(m)
}

var (
	labOnce    sync.Once
	labCluster *lab.Cluster
	labErr     error
)

// cluster returns the shared 3-node lab, bringing it up on first use.
func cluster(t *testing.T) *lab.Cluster {
	t.Helper()
	if os.Getenv("KNIT_SKIP_E2E") == "1" {
		t.Skip("KNIT_SKIP_E2E=1")
	}
	if !sandbox.InSandbox() {
		t.Fatal("end-to-end tests must run inside the sandbox")
	}
	labOnce.Do(func() {
		// The cluster outlives this call: its processes are bound to ctx.
		ctx := context.Background()
		start := time.Now()
		var agentArgs []string
		if b := os.Getenv("KNIT_LAB_PROXY_BACKEND"); b != "" {
			agentArgs = []string{"--proxy-backend", b}
		}
		labCluster, labErr = lab.Up(ctx, lab.Options{Nodes: 3, CNI: os.Getenv("KNIT_LAB_CNI"), AgentArgs: agentArgs, Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		if labErr == nil {
			t.Logf("lab up in %v", time.Since(start).Round(100*time.Millisecond))
		}
	})
	if labErr != nil {
		t.Fatalf("lab up: %v", labErr)
	}
	return labCluster
}
