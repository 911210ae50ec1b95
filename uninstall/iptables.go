package uninstall

import (
	"bytes"
	"context"
	"fmt"

	"knit.dev/knit/internal/xtables"
	"knit.dev/knit/overlay"
	"knit.dev/knit/proxy"
)

// planIPTables finds the proxy's iptables-backend chains (KNIT-* with
// their jumps from the built-in chains) and the overlay's FORWARD accept
// chain (KNIT-FORWARD in the filter table, with its jump from FORWARD) in
// each installed iptables variant and family. iptables-save lists only tables that exist, so a
// variant nobody uses is not woken up by looking.
func planIPTables(ctx context.Context) ([]Step, error) {
	variants := []string{xtables.Legacy, xtables.NFT}
	if !xtables.Host.Installed(xtables.Legacy) && !xtables.Host.Installed(xtables.NFT) {
		variants = []string{""} // plain iptables only
	}
	var steps []Step
	for _, v := range variants {
		if !xtables.Host.Installed(v) {
			continue
		}
		for _, v6 := range []bool{false, true} {
			tools := xtables.ToolsOf(v, v6)
			out, _ := xtables.Host.Save(ctx, tools.Save)
			if proxy.HoldsIPTablesRules(out) {
				steps = append(steps, Step{
					What:  fmt.Sprintf("%s: the service proxy's KNIT- chains and their jumps", tools.IPTables),
					apply: func() error { return proxy.RemoveIPTablesRules(ctx, tools, v6) },
				})
			}
			if !bytes.Contains(out, []byte(":"+xtables.ForwardChain+" ")) {
				continue
			}
			steps = append(steps, Step{
				What:  fmt.Sprintf("%s chain filter %s and its jump from FORWARD", tools.IPTables, xtables.ForwardChain),
				apply: func() error { return overlay.RemoveForwardRules(ctx, tools, v6) },
			})
		}
	}
	return steps, nil
}
