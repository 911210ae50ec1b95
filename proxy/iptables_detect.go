package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/xtables"
)

// The variant detection (legacy or nft, and the mismatch report) lives in
// internal/xtables, shared with the overlay's FORWARD rules.

// Variants of iptables.
const (
	iptLegacy = xtables.Legacy
	iptNFT    = xtables.NFT
)

// iptDetection is what detection found and chose.
type iptDetection = xtables.Detection

// iptHost runs the node's iptables programs; tests replace it.
var iptHost = xtables.Host

// newIPTables detects the variant (backend is "iptables", or
// "iptables-legacy" / "iptables-nft" to force one) and opens it for both
// families; IPv6 is optional (a kernel without it gets IPv4 rules only).
func newIPTables(backend string, log *slog.Logger) (*iptBackend, error) {
	want := strings.TrimPrefix(strings.TrimPrefix(backend, BackendIPTables), "-")
	det, err := iptHost.Detect(context.Background(), want)
	if err != nil {
		return nil, err
	}
	fams := map[family]iptTables{}
	var errs []error
	for _, f := range []family{v4, v6} {
		x, err := newIPTExec(f, det.Tools(f == v6))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", det.Tools(f == v6).IPTables, err))
			continue
		}
		fams[f] = x
	}
	if len(fams) == 0 {
		return nil, fmt.Errorf("iptables-%s not usable: %w", det.Variant, errors.Join(errs...))
	}
	if fams[v6] == nil {
		log.Warn("ip6tables not usable: IPv6 Services get no rules", "err", errors.Join(errs...))
	}
	b := newIPTBackend(fams, log)
	b.detect = det
	log.Info("using the iptables backend", "variant", "iptables-"+det.Variant, "why", det.Why,
		"legacyRules", det.Rules[iptLegacy], "nftRules", det.Rules[iptNFT])
	if det.Mismatch {
		log.Warn(det.MismatchText())
	}
	return b, nil
}

// initBackend takes the iptables backend, if chosen, and registers the
// backend's metrics.
func (p *Proxier) initBackend(ipt *iptBackend, reg prometheus.Registerer) error {
	p.ipt = ipt
	name := BackendNFTables
	mismatch := 0.0
	if ipt != nil {
		ipt.onFlush = func() {
			p.needFull.Store(true)
			p.requestSync()
		}
		name = BackendIPTables
		if ipt.detect != nil {
			name += "-" + ipt.detect.Variant
			if ipt.detect.Mismatch {
				mismatch = 1
			}
		}
	}
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "knit_proxy_backend_info",
		Help: "The backend the proxy programs: nftables, iptables-legacy or iptables-nft (value 1).",
	}, []string{"backend"})
	info.WithLabelValues(name).Set(1)
	mm := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "knit_proxy_iptables_mismatch",
		Help: "Whether both iptables-legacy and iptables-nft held rules when the proxy started (1): components disagree on the variant; see the agent's log and /readyz.",
	})
	mm.Set(mismatch)
	if reg != nil {
		for _, c := range []prometheus.Collector{info, mm} {
			if err := reg.Register(c); err != nil {
				return fmt.Errorf("proxy: metrics: %w", err)
			}
		}
	}
	return nil
}

// Warnings are problems worth an operator's attention that do not make the
// proxy unready; the agent shows them on /readyz.
func (p *Proxier) Warnings() []string {
	if p.ipt != nil && p.ipt.detect != nil && p.ipt.detect.Mismatch {
		return []string{p.ipt.detect.MismatchText()}
	}
	return nil
}

// removeOtherBackend deletes what another of knit's backends left in the
// kernel: after a switch (by flag, or auto choosing differently after an
// upgrade) those rules would still DNAT new connections, to endpoints that
// may be gone. It runs once, after the first successful full sync, so that
// there is no moment without rules; failures are logged, not fatal.
func (p *Proxier) removeOtherBackend(ctx context.Context) {
	if p.ipt == nil {
		// nftables in use: knit's chains in either iptables are leftovers.
		removeIPTablesLeftovers(ctx, "", p.log)
		return
	}
	if p.ipt.detect == nil {
		return
	}
	removeIPTablesLeftovers(ctx, p.ipt.detect.Variant, p.log)
	nft, err := knftables.New(knftables.InetFamily, tableName)
	if err != nil {
		return // no nftables here: nothing to remove
	}
	if _, err := nft.List(ctx, "chains"); err != nil {
		return // no table (knftables.IsNotFound), or nothing we can do
	}
	tx := nft.NewTransaction()
	tx.Delete(&knftables.Table{})
	if err := nft.Run(ctx, tx); err != nil {
		p.log.Warn("removing the nftables table of an earlier run failed", "table", tableName, "err", err)
		return
	}
	p.log.Info("removed the nftables table of an earlier run", "table", tableName)
}

// removeIPTablesLeftovers removes the proxy's jumps and chains from every
// installed iptables variant except keep (the overlay's chain stays).
func removeIPTablesLeftovers(ctx context.Context, keep string, log *slog.Logger) {
	for _, variant := range []string{iptLegacy, iptNFT} {
		if variant == keep || !iptHost.Installed(variant) {
			continue
		}
		for _, f := range []family{v4, v6} {
			tools := xtables.ToolsOf(variant, f == v6)
			out, _ := iptHost.Save(ctx, tools.Save)
			if !holdsProxyChains(out) {
				continue
			}
			x, err := newIPTExec(f, tools)
			if err == nil {
				err = x.removeAll(ctx)
			}
			if err != nil {
				log.Warn("removing knit's iptables rules of an earlier run failed", "variant", "iptables-"+variant, "family", f.String(), "err", err)
				continue
			}
			log.Info("removed knit's iptables rules of an earlier run", "variant", "iptables-"+variant, "family", f.String())
		}
	}
}

// proxyChain tells the proxy's chains (KNIT-*) from the overlay's
// xtables.ForwardChain, which the proxy never removes.
func proxyChain(name string) bool {
	return strings.HasPrefix(name, "KNIT-") && name != xtables.ForwardChain
}

// holdsProxyChains reports whether an iptables-save output declares one of
// the proxy's chains.
func holdsProxyChains(save []byte) bool {
	sc := bufio.NewScanner(bytes.NewReader(save))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, ":") && proxyChain(strings.Fields(l[1:])[0]) {
			return true
		}
	}
	return false
}

// HoldsIPTablesRules reports whether an iptables-save output (one variant,
// one family) holds the iptables backend's chains; for `knit uninstall`.
func HoldsIPTablesRules(save []byte) bool { return holdsProxyChains(save) }

// RemoveIPTablesRules deletes the iptables backend's jumps and KNIT-
// chains from one variant's tables of one family (the overlay's
// KNIT-FORWARD stays: uninstall removes it on its own); for `knit
// uninstall`. An agent never calls it on shutdown.
func RemoveIPTablesRules(ctx context.Context, tools xtables.Tools, ipv6 bool) error {
	f := v4
	if ipv6 {
		f = v6
	}
	x, err := newIPTExec(f, tools)
	if err != nil {
		return err
	}
	return x.removeAll(ctx)
}
