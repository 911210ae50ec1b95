package overlay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-iptables/iptables"
	"github.com/prometheus/client_golang/prometheus"

	"knit.dev/knit/internal/xtables"
)

// Forward accept rules: pod traffic through a host firewall whose FORWARD
// policy is DROP (Docker sets it, and so do many hardening guides).
//
// A packet a node forwards for its pods goes through the forward hook of
// every firewall on the node: the filter FORWARD chain of iptables-legacy,
// the one of iptables-nft (a base chain in table ip/ip6 filter), and any
// native nftables base chain hooked at forward. An accept in knit's own
// nftables table cannot help: a verdict of accept only ends that base chain,
// and the packet still meets every other one, whose drop is final. So the
// accept goes into the iptables FORWARD chain itself, as flannel's
// FLANNEL-FWD and kube-proxy's KUBE-FORWARD do:
//
//	filter FORWARD (policy DROP)
//	  1: -m comment --comment "knit overlay forward rules" -j KNIT-FORWARD
//	  ...the firewall's own rules...
//	KNIT-FORWARD
//	  -s <cluster CIDR> -j ACCEPT                          from pods (egress, pod to pod, pod to Service)
//	  -d <cluster CIDR> -j ACCEPT                          to pods (pod to pod, Service traffic DNATed to a pod)
//	  -m mark --mark <proxy mark> -j ACCEPT                Service traffic the proxy marked for masquerade
//	  -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT replies
//
// in each iptables variant in use (xtables.InUse: the one the node uses,
// and the other one too if it holds rules or a DROP policy, as both see
// every packet, or KNIT-FORWARD of an earlier run, which is kept current
// rather than left stale), for each IP family the cluster has.
//
// Level-triggered like the rest of the overlay. The chain is written with
// one iptables-restore --noflush batch (declaring the chain flushes it, and
// the batch commits atomically); its first rule's comment carries a hash
// of the whole chain, so a sync (or a restarted agent) that finds the chain
// as rendered leaves it alone. The jump is inserted at the top of FORWARD
// when missing, and left where it is when present (knit does not fight
// over the order with a firewall that inserted its own rules above it).
// Every sync checks the jump (one iptables -C); full syncs (the timer,
// the first, after a failure) also check the chain's contents. The variants
// are detected at the first sync; a full sync also looks at the variants
// not yet programmed, so a firewall (Docker) that sets a DROP policy in the
// other variant after knit started is covered at the next timer sync.
//
// A native nftables firewall (a table of its own with a forward base chain
// of policy drop) is beyond what knit can fix without rewriting someone
// else's ruleset: full syncs look for one and report it (see nftForwardDrops).

var fwdJump = xtables.ForwardJump()

// fwdIPT is one family's filter table of one iptables variant.
type fwdIPT interface {
	// listChain returns the rules of chain ("-A ..." lines, as iptables -S
	// prints them); exists is false when there is no such chain.
	listChain(chain string) (rules []string, exists bool, err error)
	// jumpExists reports whether FORWARD holds the rule args.
	jumpExists(args []string) (bool, error)
	insertJump(args []string) error
	deleteJump(args []string) error
	// restore applies an iptables-restore --noflush batch.
	restore(ctx context.Context, data []byte) error
}

// fwdTarget is one (variant, family) the rules go into.
type fwdTarget struct {
	name   string // "iptables-nft IPv4"
	fam    family
	ipt    fwdIPT
	marker string // marker of the chain last applied or found; "" unknown
}

// forward keeps the KNIT-FORWARD chains and jumps in the rendered state.
// Owned by the sync loop.
type forward struct {
	log *slog.Logger
	sys xtables.System
	// open opens one family's iptables of a variant; tests replace it.
	open func(tools xtables.Tools, fam family) (fwdIPT, error)
	// nftChains lists the node's nftables chains (nft -j list chains);
	// tests replace it.
	nftChains func(ctx context.Context) ([]byte, error)

	detected bool
	absent   bool // no iptables userland: logged once
	targets  []*fwdTarget
	variants map[string]bool // variants programmed (or tried)
	removed  bool            // rules off and none found

	blocked string // last reported nftables forward drops, "" none
}

func newForward(log *slog.Logger) *forward {
	return &forward{
		log:       log,
		sys:       xtables.Host,
		open:      openFwdIPT,
		nftChains: listNFTChains,
		variants:  map[string]bool{},
	}
}

// fwdRules renders the chain's rules for one family (the text after
// "-A KNIT-FORWARD "), nil when the cluster has no CIDR of that family.
// The first rule's comment carries a hash of the whole chain.
func fwdRules(cidrs []netip.Prefix, fam family, mark uint32) []string {
	var rules []string
	for _, c := range cidrs {
		if familyOf(c.Addr()) != fam {
			continue
		}
		rules = append(rules,
			fmt.Sprintf(`-s %s -m comment --comment "knit: from pods" -j ACCEPT`, c),
			fmt.Sprintf(`-d %s -m comment --comment "knit: to pods" -j ACCEPT`, c))
	}
	if len(rules) == 0 {
		return nil
	}
	if mark != 0 {
		rules = append(rules, fmt.Sprintf(`-m mark --mark %#x/%#x -m comment --comment "knit: service traffic marked for masquerade" -j ACCEPT`, mark, mark))
	}
	rules = append(rules, `-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "knit: replies" -j ACCEPT`)
	h := sha256.New()
	for _, r := range rules {
		fmt.Fprintf(h, "%s\x00", r)
	}
	rules[0] = strings.Replace(rules[0], `--comment "knit: `, `--comment "knit-forward `+fwdMarker(h.Sum(nil))+`: `, 1)
	return rules
}

func fwdMarker(sum []byte) string { return hex.EncodeToString(sum)[:16] }

// markerOf returns the marker in a rendered chain's first rule.
func markerOf(rules []string) string {
	if len(rules) == 0 {
		return ""
	}
	_, after, ok := strings.Cut(rules[0], `"knit-forward `)
	if !ok {
		return ""
	}
	m, _, _ := strings.Cut(after, ":")
	return m
}

// fwdRestoreData is the batch that (re)writes the chain.
func fwdRestoreData(rules []string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "*filter\n:%s - [0:0]\n", xtables.ForwardChain)
	for _, r := range rules {
		fmt.Fprintf(&b, "-A %s %s\n", xtables.ForwardChain, r)
	}
	b.WriteString("COMMIT\n")
	return b.Bytes()
}

// sync makes every target hold the rendered chain and the jump, or, when
// the rules are off, removes them. It reports whether it changed anything.
func (fw *forward) sync(ctx context.Context, cfg *Config, full bool, changed func(op string)) (bool, error) {
	if !cfg.ForwardRules {
		return fw.remove(ctx, changed)
	}
	fw.removed = false
	if !fw.detected {
		fw.detected = true
		ds, err := fw.sys.InUse(ctx)
		if err != nil {
			fw.absent = true
			fw.log.Info("no iptables on this node: no FORWARD accept rules (a FORWARD policy of DROP would need them)", "err", err)
			return false, nil
		}
		for _, d := range ds {
			fw.addVariant(d, cfg)
		}
	} else if full && !fw.absent {
		// A firewall started after knit may have put a DROP policy or
		// rules into the variant not yet programmed.
		for _, v := range []string{xtables.Legacy, xtables.NFT} {
			if fw.variants[v] || !fw.sys.Installed(v) {
				continue
			}
			if u := fw.sys.Usage(ctx, v); u.NeedsForward() {
				fw.addVariant(xtables.Detection{Variant: v, Why: "it now holds rules, a FORWARD policy of DROP or knit's chain"}, cfg)
			}
		}
	}
	var errs []error
	wrote := false
	for _, t := range fw.targets {
		rules := fwdRules(cfg.ClusterCIDRs, t.fam, cfg.ForwardMark)
		if rules == nil {
			continue
		}
		ch, err := fw.ensure(ctx, t, rules, full, changed)
		wrote = wrote || ch
		if err != nil {
			t.marker = ""
			errs = append(errs, fmt.Errorf("%s: %w", t.name, err))
		}
	}
	return wrote, errors.Join(errs...)
}

// addVariant opens the variant's iptables for each family the cluster
// has.
func (fw *forward) addVariant(d xtables.Detection, cfg *Config) {
	fw.variants[d.Variant] = true
	for _, fam := range families {
		if fwdRules(cfg.ClusterCIDRs, fam, 0) == nil {
			continue
		}
		tools := d.Tools(fam == v6)
		name := fmt.Sprintf("iptables-%s %s", d.Variant, fam)
		ipt, err := fw.open(tools, fam)
		if err != nil {
			// ip6tables without IPv6 in the kernel, typically.
			fw.log.Info("no FORWARD accept rules in "+name, "err", err)
			continue
		}
		fw.targets = append(fw.targets, &fwdTarget{name: name, fam: fam, ipt: ipt})
		fw.log.Info("FORWARD accept rules go into "+name, "why", d.Why)
	}
}

// ensure brings one target to the rendered state. Without full, a chain
// applied earlier (same marker) and a jump that is still there cost one
// iptables -C; a jump that is gone (or whose chain is gone: then -C fails)
// makes it look at everything.
func (fw *forward) ensure(ctx context.Context, t *fwdTarget, rules []string, full bool, changed func(op string)) (bool, error) {
	want := markerOf(rules)
	if t.marker == want && !full {
		if ok, err := t.ipt.jumpExists(fwdJump); err == nil && ok {
			return false, nil
		}
	}
	wrote := false
	have, exists, err := t.ipt.listChain(xtables.ForwardChain)
	if err != nil {
		return false, fmt.Errorf("list %s: %w", xtables.ForwardChain, err)
	}
	if !exists || len(have) != len(rules) || markerOf(have) != want {
		if err := t.ipt.restore(ctx, fwdRestoreData(rules)); err != nil {
			return false, err
		}
		changed("chain")
		wrote = true
	}
	t.marker = want
	ok, err := t.ipt.jumpExists(fwdJump)
	if err != nil {
		return wrote, fmt.Errorf("check the jump from FORWARD: %w", err)
	}
	if !ok {
		if err := t.ipt.insertJump(fwdJump); err != nil {
			return wrote, fmt.Errorf("insert the jump from FORWARD: %w", err)
		}
		changed("jump")
		wrote = true
	}
	return wrote, nil
}

// remove deletes the jump and the chain from every installed variant that
// holds them (the rules were turned off).
//
// It looks once per run (and again after a failure): the flag only changes
// with a restart, and the look costs an iptables-save of every variant.
func (fw *forward) remove(ctx context.Context, changed func(op string)) (bool, error) {
	if fw.removed {
		return false, nil
	}
	var errs []error
	deleted := false
	for _, v := range []string{xtables.Legacy, xtables.NFT, ""} {
		if !fw.sys.Installed(v) {
			continue
		}
		for _, fam := range families {
			tools := xtables.ToolsOf(v, fam == v6)
			// iptables-save lists the tables that exist, and loads no
			// kernel module: a variant never used stays unused.
			out, _ := fw.sys.Save(ctx, tools.Save)
			if !bytes.Contains(out, []byte(":"+xtables.ForwardChain+" ")) {
				continue
			}
			ipt, err := fw.open(tools, fam)
			if err == nil {
				err = removeFwd(ctx, ipt)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", tools.IPTables, err))
				continue
			}
			changed("delete")
			deleted = true
		}
	}
	fw.targets, fw.detected, fw.variants = nil, false, map[string]bool{}
	fw.removed = len(errs) == 0
	return deleted, errors.Join(errs...)
}

// RemoveForwardRules deletes the overlay's jump and chain from one
// variant's filter table of one family; for `knit uninstall`. An agent
// never calls it (a sync removes them when the rules are turned off).
func RemoveForwardRules(ctx context.Context, tools xtables.Tools, ipv6 bool) error {
	fam := v4
	if ipv6 {
		fam = v6
	}
	ipt, err := openFwdIPT(tools, fam)
	if err != nil {
		return err
	}
	return removeFwd(ctx, ipt)
}

// removeFwd deletes knit's jump and chain from one table.
func removeFwd(ctx context.Context, ipt fwdIPT) error {
	if _, exists, err := ipt.listChain(xtables.ForwardChain); err != nil || !exists {
		return err
	}
	for {
		ok, err := ipt.jumpExists(fwdJump)
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		if err := ipt.deleteJump(fwdJump); err != nil {
			return err
		}
	}
	return ipt.restore(ctx, []byte(fmt.Sprintf("*filter\n:%s - [0:0]\n-X %s\nCOMMIT\n", xtables.ForwardChain, xtables.ForwardChain)))
}

// fwdExec is the real iptables of one family: go-iptables for the jump and
// the listing, the variant's iptables-restore for the chain.
type fwdExec struct {
	ipt         *iptables.IPTables
	restorePath string
}

func openFwdIPT(tools xtables.Tools, fam family) (fwdIPT, error) {
	proto := iptables.ProtocolIPv4
	if fam == v6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(tools.IPTables), iptables.Timeout(5))
	if err != nil {
		return nil, err
	}
	if _, err := exec.LookPath(tools.Restore); err != nil {
		return nil, err
	}
	// Fail now, not at every sync, if the kernel lacks the table.
	if _, err := ipt.ListChains("filter"); err != nil {
		return nil, err
	}
	return &fwdExec{ipt: ipt, restorePath: tools.Restore}, nil
}

func (x *fwdExec) listChain(chain string) ([]string, bool, error) {
	// One iptables -S: a missing chain is its exit status 1, as
	// go-iptables' ChainExists tells it (which would be a second exec).
	lines, err := x.ipt.List("filter", chain)
	if eerr, ok := err.(*iptables.Error); ok && eerr.ExitStatus() == 1 {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	var rules []string
	for _, l := range lines {
		if r, ok := strings.CutPrefix(l, "-A "+chain+" "); ok {
			rules = append(rules, r)
		}
	}
	return rules, true, nil
}

func (x *fwdExec) jumpExists(args []string) (bool, error) {
	return x.ipt.Exists("filter", "FORWARD", args...)
}

func (x *fwdExec) insertJump(args []string) error {
	return x.ipt.Insert("filter", "FORWARD", 1, args...)
}

func (x *fwdExec) deleteJump(args []string) error {
	return x.ipt.Delete("filter", "FORWARD", args...)
}

func (x *fwdExec) restore(ctx context.Context, data []byte) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, x.restorePath, "--noflush", "-w", "5")
	cmd.Stdin = bytes.NewReader(data)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", x.restorePath, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// nftDrop is a native nftables base chain at the forward hook whose policy
// is drop, in a table that is neither knit's nor iptables-nft's.
type nftDrop struct{ Family, Table, Chain string }

func (d nftDrop) String() string { return d.Family + " " + d.Table + " " + d.Chain }

// nftForwardDrops parses the chains of an `nft -j` listing. The FORWARD chains of the
// tables ip/ip6 filter are iptables-nft's (the accept rules above cover
// them); knit's own tables never drop.
func nftForwardDrops(js []byte) ([]nftDrop, error) {
	var doc struct {
		Nftables []struct {
			Chain *struct {
				Family, Table, Name, Hook, Policy, Type string
			} `json:"chain"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		return nil, fmt.Errorf("nft -j list chains: %w", err)
	}
	var out []nftDrop
	for _, e := range doc.Nftables {
		c := e.Chain
		if c == nil || c.Hook != "forward" || c.Policy != "drop" || strings.HasPrefix(c.Table, "knit-") {
			continue
		}
		if (c.Family == "ip" || c.Family == "ip6") && c.Table == "filter" && c.Name == "FORWARD" {
			continue // iptables-nft's
		}
		out = append(out, nftDrop{c.Family, c.Table, c.Name})
	}
	slices.SortFunc(out, func(a, b nftDrop) int { return strings.Compare(a.String(), b.String()) })
	return out, nil
}

// listNFTChains returns the chains of the node's nftables tables as one
// `nft -j` document. Tables are listed one by one so that knit's own (the
// proxy's holds a chain per Service) and iptables-nft's nat tables (huge
// under an iptables proxy, and without a forward hook) are never dumped.
func listNFTChains(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nft", "-j", "list", "tables").Output()
	if err != nil {
		return nil, err
	}
	var tables struct {
		Nftables []struct {
			Table *struct{ Family, Name string } `json:"table"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &tables); err != nil {
		return nil, fmt.Errorf("nft -j list tables: %w", err)
	}
	var chains []json.RawMessage
	for _, e := range tables.Nftables {
		t := e.Table
		if t == nil || strings.HasPrefix(t.Name, "knit-") || ((t.Family == "ip" || t.Family == "ip6") && t.Name == "nat") {
			continue
		}
		out, err := exec.CommandContext(ctx, "nft", "-j", "-t", "list", "table", t.Family, t.Name).Output()
		if err != nil {
			continue // deleted meanwhile
		}
		var doc struct {
			Nftables []map[string]json.RawMessage `json:"nftables"`
		}
		if json.Unmarshal(out, &doc) != nil {
			continue
		}
		for _, o := range doc.Nftables {
			if c, ok := o["chain"]; ok {
				chains = append(chains, json.RawMessage(`{"chain":`+string(c)+`}`))
			}
		}
	}
	return json.Marshal(map[string][]json.RawMessage{"nftables": chains})
}

// checkNFT looks for native nftables forward chains with policy drop and
// reports a change (log line, gauge); it never fails the sync. It returns
// the chains found.
func (fw *forward) checkNFT(ctx context.Context, gauge *prometheus.GaugeVec) []nftDrop {
	js, err := fw.nftChains(ctx)
	if err != nil {
		return nil // no nft here: no native nftables firewall either
	}
	drops, err := nftForwardDrops(js)
	if err != nil {
		fw.log.Debug("could not read the nftables chains", "err", err)
		return nil
	}
	names := make([]string, len(drops))
	for i, d := range drops {
		names[i] = d.String()
	}
	now := strings.Join(names, ", ")
	if now == fw.blocked {
		return drops
	}
	fw.blocked = now
	gauge.Reset()
	for _, d := range drops {
		gauge.WithLabelValues(d.Family, d.Table, d.Chain).Set(1)
	}
	if now == "" {
		fw.log.Info("no nftables forward chain with policy drop any more")
	} else {
		fw.log.Warn("an nftables forward chain with policy drop may drop pod traffic between nodes, and knit's accept rules cannot "+
			"override it: add accept rules for the cluster CIDR(s) to it (e.g. ip saddr <cluster CIDR> accept; ip daddr <cluster CIDR> accept; "+
			"ct state established,related accept)", "chains", now)
	}
	return drops
}
