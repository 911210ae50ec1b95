package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/knftables"
)

// Two iptables implementations exist side by side on most distributions:
// iptables-legacy (the x_tables kernel API) and iptables-nft (the same
// command line over nftables). Their rules live in different kernel tables
// and both are evaluated, so when the components of a node disagree on
// which one to use (the CNI plugin or kube-proxy in a container with one,
// the host with the other), rules such as masquerading or a DROP policy
// apply in one world and not in the other. That mismatch broke networking
// for k3s and flannel users more than once. knit picks the variant the way
// kubernetes-sigs/iptables-wrappers (kube-proxy's images) and k3s do:
// kubelet's KUBE-IPTABLES-HINT chain if present, else the variant that holds
// more rules (ties go to nft), and reports a mismatch when both hold rules.

// Variants of iptables.
const (
	iptLegacy = "legacy"
	iptNFT    = "nft"
)

// iptCommands are one family's iptables programs of one variant.
type iptCommands struct{ iptables, save, restore string }

func variantCommands(variant string) map[family]iptCommands {
	suffix := ""
	if variant != "" {
		suffix = "-" + variant
	}
	return map[family]iptCommands{
		v4: {"iptables" + suffix, "iptables" + suffix + "-save", "iptables" + suffix + "-restore"},
		v6: {"ip6tables" + suffix, "ip6tables" + suffix + "-save", "ip6tables" + suffix + "-restore"},
	}
}

// iptDetection is what detectIPTables found and chose.
type iptDetection struct {
	variant string // iptLegacy or iptNFT
	cmds    map[family]iptCommands
	// rules counts the rules ("-A" lines of *-save) each variant holds;
	// absent when that variant's tools are not installed.
	rules    map[string]int
	why      string
	mismatch bool
}

func (d *iptDetection) mismatchText() string {
	if !d.mismatch {
		return ""
	}
	return fmt.Sprintf("iptables mismatch: both iptables-legacy (%d rules) and iptables-nft (%d rules) hold rules on this node; "+
		"packets go through both, so components using the other variant (a CNI plugin, kube-proxy, a host firewall, Docker) "+
		"do not see knit's rules and knit does not see theirs; knit uses iptables-%s (%s); make every component use one variant "+
		"(for example update-alternatives --set iptables /usr/sbin/iptables-%s), or use --proxy-backend=nftables",
		d.rules[iptLegacy], d.rules[iptNFT], d.variant, d.why, d.variant)
}

// lookPath is exec.LookPath, replaced in tests.
var lookPath = exec.LookPath

// iptSave runs an iptables-save binary and returns its output, replaced in
// tests.
var iptSave = func(ctx context.Context, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, path).Output()
}

// iptVersion runs "iptables --version", replaced in tests.
var iptVersion = func(ctx context.Context, path string) ([]byte, error) {
	return exec.CommandContext(ctx, path, "--version").Output()
}

func installed(c map[family]iptCommands) bool {
	for _, p := range []string{c[v4].iptables, c[v4].save, c[v4].restore} {
		if _, err := lookPath(p); err != nil {
			return false
		}
	}
	return true
}

// countRules counts the rules of a variant in both families, and whether
// kubelet's hint chain is there.
func countRules(ctx context.Context, c map[family]iptCommands) (rules int, hint bool) {
	for _, f := range []family{v4, v6} {
		out, err := iptSave(ctx, c[f].save)
		if err != nil && len(out) == 0 {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(out))
		sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
		for sc.Scan() {
			l := sc.Text()
			switch {
			case strings.HasPrefix(l, "-A "):
				rules++
			case strings.HasPrefix(l, ":KUBE-IPTABLES-HINT "):
				hint = true
			}
		}
	}
	return rules, hint
}

// detectIPTables picks the iptables variant: want ("legacy", "nft") if
// given, else the one in use.
func detectIPTables(ctx context.Context, want string) (*iptDetection, error) {
	d := &iptDetection{rules: map[string]int{}}
	switch want {
	case iptLegacy, iptNFT:
		d.cmds = variantCommands(want)
		if !installed(d.cmds) {
			return nil, fmt.Errorf("iptables-%s requested but %s, %s or %s is not installed", want, d.cmds[v4].iptables, d.cmds[v4].save, d.cmds[v4].restore)
		}
		d.variant, d.why = want, "forced by flag"
		d.rules[iptLegacy], _ = countIfInstalled(ctx, iptLegacy)
		d.rules[iptNFT], _ = countIfInstalled(ctx, iptNFT)
	case "":
		legacy, nft := variantCommands(iptLegacy), variantCommands(iptNFT)
		hasLegacy, hasNFT := installed(legacy), installed(nft)
		switch {
		case hasLegacy && hasNFT:
			nl, legacyHint := countRules(ctx, legacy)
			nn, nftHint := countRules(ctx, nft)
			d.rules[iptLegacy], d.rules[iptNFT] = nl, nn
			switch {
			case nftHint:
				d.variant, d.why = iptNFT, "kubelet's KUBE-IPTABLES-HINT chain is in iptables-nft"
			case legacyHint:
				d.variant, d.why = iptLegacy, "kubelet's KUBE-IPTABLES-HINT chain is in iptables-legacy"
			case nl > nn:
				d.variant, d.why = iptLegacy, fmt.Sprintf("it holds more rules (%d vs %d)", nl, nn)
			default:
				d.variant, d.why = iptNFT, fmt.Sprintf("it holds at least as many rules (%d vs %d)", nn, nl)
			}
		case hasLegacy || hasNFT:
			d.variant = iptLegacy
			if hasNFT {
				d.variant = iptNFT
			}
			d.why = "the only variant installed"
			d.rules[d.variant], _ = countRules(ctx, variantCommands(d.variant))
		default:
			// Only plain iptables (many small distributions): ask it.
			d.cmds = variantCommands("")
			if !installed(d.cmds) {
				return nil, errors.New("no iptables found (need iptables, iptables-save and iptables-restore, or their -legacy/-nft variants)")
			}
			out, err := iptVersion(ctx, d.cmds[v4].iptables)
			if err != nil {
				return nil, fmt.Errorf("iptables --version: %w", err)
			}
			d.variant, d.why = iptLegacy, "plain iptables, legacy by its --version"
			if strings.Contains(string(out), "nf_tables") {
				d.variant, d.why = iptNFT, "plain iptables, nf_tables by its --version"
			}
			d.rules[d.variant], _ = countRules(ctx, d.cmds)
		}
		if d.cmds == nil {
			d.cmds = variantCommands(d.variant)
		}
	default:
		return nil, fmt.Errorf("unknown iptables variant %q (want legacy or nft)", want)
	}
	d.mismatch = d.rules[iptLegacy] > 0 && d.rules[iptNFT] > 0
	return d, nil
}

func countIfInstalled(ctx context.Context, variant string) (int, bool) {
	c := variantCommands(variant)
	if !installed(c) {
		return 0, false
	}
	return countRules(ctx, c)
}

// newIPTables detects the variant (backend is "iptables", or
// "iptables-legacy" / "iptables-nft" to force one) and opens it for both
// families; IPv6 is optional (a kernel without it gets IPv4 rules only).
func newIPTables(backend string, log *slog.Logger) (*iptBackend, error) {
	want := strings.TrimPrefix(strings.TrimPrefix(backend, BackendIPTables), "-")
	det, err := detectIPTables(context.Background(), want)
	if err != nil {
		return nil, err
	}
	fams := map[family]iptTables{}
	var errs []error
	for _, f := range []family{v4, v6} {
		x, err := newIPTExec(f, det.cmds[f])
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", det.cmds[f].iptables, err))
			continue
		}
		fams[f] = x
	}
	if len(fams) == 0 {
		return nil, fmt.Errorf("iptables-%s not usable: %w", det.variant, errors.Join(errs...))
	}
	if fams[v6] == nil {
		log.Warn("ip6tables not usable: IPv6 Services get no rules", "err", errors.Join(errs...))
	}
	b := newIPTBackend(fams, log)
	b.detect = det
	log.Info("using the iptables backend", "variant", "iptables-"+det.variant, "why", det.why,
		"legacyRules", det.rules[iptLegacy], "nftRules", det.rules[iptNFT])
	if det.mismatch {
		log.Warn(det.mismatchText())
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
			name += "-" + ipt.detect.variant
			if ipt.detect.mismatch {
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
	if p.ipt != nil && p.ipt.detect != nil && p.ipt.detect.mismatch {
		return []string{p.ipt.detect.mismatchText()}
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
	removeIPTablesLeftovers(ctx, p.ipt.detect.variant, p.log)
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

// removeIPTablesLeftovers removes knit's jumps and chains from every
// installed iptables variant except keep.
func removeIPTablesLeftovers(ctx context.Context, keep string, log *slog.Logger) {
	for _, variant := range []string{iptLegacy, iptNFT} {
		cmds := variantCommands(variant)
		if variant == keep || !installed(cmds) {
			continue
		}
		for _, f := range []family{v4, v6} {
			out, _ := iptSave(ctx, cmds[f].save)
			if !bytes.Contains(out, []byte(":KNIT-")) && !bytes.Contains(out, []byte("-j KNIT-")) {
				continue
			}
			x, err := newIPTExec(f, cmds[f])
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
