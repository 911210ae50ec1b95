// Package xtables finds the iptables userland in use on a node. The proxy
// (its iptables backend) and the overlay (its FORWARD accept rules) both
// need to know which of the two iptables implementations the node uses, and
// must decide the same way.
//
// Two iptables implementations exist side by side on most distributions:
// iptables-legacy (the x_tables kernel API) and iptables-nft (the same
// command line over nftables). Their rules live in different kernel tables
// and both are evaluated, so when the components of a node disagree on
// which one to use (the CNI plugin or kube-proxy in a container with one,
// the host with the other), rules such as masquerading or a DROP policy
// apply in one world and not in the other. That mismatch broke networking
// for k3s and flannel users more than once. Detect picks the variant the way
// kubernetes-sigs/iptables-wrappers (kube-proxy's images) and k3s do:
// kubelet's KUBE-IPTABLES-HINT chain if present, else the variant that holds
// more rules (ties go to nft), and reports a mismatch when both hold rules.
//
// The rules of the overlay's own chain (ForwardChain) and its jump are not
// counted: they follow the node's choice and must not make it.
package xtables

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// Variants of iptables.
const (
	Legacy = "legacy"
	NFT    = "nft"
)

// ForwardChain is the overlay's chain in the filter table of each iptables
// variant in use (overlay/forward.go). It is named here because the proxy,
// which removes every other KNIT-* chain of a variant it does not use, must
// leave it alone.
const ForwardChain = "KNIT-FORWARD"

// ForwardJumpComment is the comment of the overlay's jump from FORWARD to
// ForwardChain (knit uninstall looks for it).
const ForwardJumpComment = "knit overlay forward rules"

// ForwardJump returns the rule (iptables arguments) of the overlay's jump
// from FORWARD to ForwardChain: the overlay inserts it, the overlay and
// knit uninstall delete it.
func ForwardJump() []string {
	return []string{"-m", "comment", "--comment", ForwardJumpComment, "-j", ForwardChain}
}

// Tools are one family's iptables programs of one variant.
type Tools struct{ IPTables, Save, Restore string }

// ToolsOf returns the programs of variant ("" for plain iptables) for IPv4,
// or IPv6 when v6 is set.
func ToolsOf(variant string, v6 bool) Tools {
	suffix := ""
	if variant != "" {
		suffix = "-" + variant
	}
	base := "iptables"
	if v6 {
		base = "ip6tables"
	}
	return Tools{base + suffix, base + suffix + "-save", base + suffix + "-restore"}
}

// Usage is what one variant's iptables-save showed, both families.
type Usage struct {
	// Rules counts "-A" lines, except the overlay's own.
	Rules int
	// Hint: kubelet's KUBE-IPTABLES-HINT chain is there.
	Hint bool
	// ForwardDrop: the filter FORWARD chain's policy is DROP (in either
	// family).
	ForwardDrop bool
	// Own: the overlay's ForwardChain is there (an earlier run put it
	// there; it is kept up to date rather than left stale).
	Own bool
}

// NeedsForward reports whether the overlay's FORWARD rules belong in a
// variant that is not the one the node uses.
func (u Usage) NeedsForward() bool { return u.Rules > 0 || u.ForwardDrop || u.Own }

// Detection is what Detect found and chose.
type Detection struct {
	// Variant is Legacy or NFT.
	Variant string
	// Plain: the programs are the unsuffixed iptables (a distribution
	// with only one variant installed under the plain name).
	Plain bool
	// Rules counts the rules each variant holds; absent when that
	// variant's tools are not installed.
	Rules    map[string]int
	Why      string
	Mismatch bool
}

// Tools are the programs of the chosen variant.
func (d *Detection) Tools(v6 bool) Tools {
	if d.Plain {
		return ToolsOf("", v6)
	}
	return ToolsOf(d.Variant, v6)
}

// MismatchText explains a mismatch to the operator, or is "".
func (d *Detection) MismatchText() string {
	if !d.Mismatch {
		return ""
	}
	return fmt.Sprintf("iptables mismatch: both iptables-legacy (%d rules) and iptables-nft (%d rules) hold rules on this node; "+
		"packets go through both, so components using the other variant (a CNI plugin, kube-proxy, a host firewall, Docker) "+
		"do not see knit's rules and knit does not see theirs; knit uses iptables-%s (%s); make every component use one variant "+
		"(for example update-alternatives --set iptables /usr/sbin/iptables-%s), or use --proxy-backend=nftables",
		d.Rules[Legacy], d.Rules[NFT], d.Variant, d.Why, d.Variant)
}

// System runs the programs; tests replace its functions.
type System struct {
	LookPath func(string) (string, error)
	// Save runs an iptables-save program and returns its output.
	Save func(ctx context.Context, path string) ([]byte, error)
	// Version runs "iptables --version".
	Version func(ctx context.Context, path string) ([]byte, error)
}

// Host is the node's own programs.
var Host = System{
	LookPath: exec.LookPath,
	Save: func(ctx context.Context, path string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return exec.CommandContext(ctx, path).Output()
	},
	Version: func(ctx context.Context, path string) ([]byte, error) {
		return exec.CommandContext(ctx, path, "--version").Output()
	},
}

// Installed reports whether the IPv4 iptables, -save and -restore programs
// of variant ("" plain) are on the PATH.
func (s System) Installed(variant string) bool {
	t := ToolsOf(variant, false)
	for _, p := range []string{t.IPTables, t.Save, t.Restore} {
		if _, err := s.LookPath(p); err != nil {
			return false
		}
	}
	return true
}

// Usage reads both families' iptables-save of variant ("" plain).
func (s System) Usage(ctx context.Context, variant string) Usage {
	var u Usage
	for _, v6 := range []bool{false, true} {
		out, err := s.Save(ctx, ToolsOf(variant, v6).Save)
		if err != nil && len(out) == 0 {
			continue
		}
		u.add(out)
	}
	return u
}

func (u *Usage) add(save []byte) {
	sc := bufio.NewScanner(bytes.NewReader(save))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	table := ""
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, "-A "):
			if !ownForwardRule(l) {
				u.Rules++
			}
		case strings.HasPrefix(l, ":KUBE-IPTABLES-HINT "):
			u.Hint = true
		case table == "filter" && strings.HasPrefix(l, ":FORWARD DROP"):
			u.ForwardDrop = true
		case table == "filter" && strings.HasPrefix(l, ":"+ForwardChain+" "):
			u.Own = true
		}
	}
}

// ownForwardRule: a rule of the overlay's chain, or the jump to it.
func ownForwardRule(l string) bool {
	return strings.HasPrefix(l, "-A "+ForwardChain+" ") || strings.HasSuffix(l, "-j "+ForwardChain)
}

// Detect picks the iptables variant: want (Legacy, NFT) if given, else the
// one in use.
func (s System) Detect(ctx context.Context, want string) (*Detection, error) {
	d, _, err := s.detect(ctx, want)
	return d, err
}

// detect is Detect, also returning the Usage it read of each variant (an
// iptables-save of both families each), so that InUse need not read them
// again.
func (s System) detect(ctx context.Context, want string) (*Detection, map[string]Usage, error) {
	d := &Detection{Rules: map[string]int{}}
	usage := map[string]Usage{}
	count := func(variant string) {
		if s.Installed(variant) {
			usage[variant] = s.Usage(ctx, variant)
			d.Rules[variant] = usage[variant].Rules
		}
	}
	switch want {
	case Legacy, NFT:
		if !s.Installed(want) {
			t := ToolsOf(want, false)
			return nil, nil, fmt.Errorf("iptables-%s requested but %s, %s or %s is not installed", want, t.IPTables, t.Save, t.Restore)
		}
		d.Variant, d.Why = want, "forced by flag"
		count(Legacy)
		count(NFT)
	case "":
		hasLegacy, hasNFT := s.Installed(Legacy), s.Installed(NFT)
		switch {
		case hasLegacy && hasNFT:
			count(Legacy)
			count(NFT)
			l, n := usage[Legacy], usage[NFT]
			switch {
			case n.Hint:
				d.Variant, d.Why = NFT, "kubelet's KUBE-IPTABLES-HINT chain is in iptables-nft"
			case l.Hint:
				d.Variant, d.Why = Legacy, "kubelet's KUBE-IPTABLES-HINT chain is in iptables-legacy"
			case l.Rules > n.Rules:
				d.Variant, d.Why = Legacy, fmt.Sprintf("it holds more rules (%d vs %d)", l.Rules, n.Rules)
			default:
				d.Variant, d.Why = NFT, fmt.Sprintf("it holds at least as many rules (%d vs %d)", n.Rules, l.Rules)
			}
		case hasLegacy || hasNFT:
			d.Variant = Legacy
			if hasNFT {
				d.Variant = NFT
			}
			d.Why = "the only variant installed"
			count(d.Variant)
		default:
			// Only plain iptables (many small distributions): ask it.
			if !s.Installed("") {
				return nil, nil, errors.New("no iptables found (need iptables, iptables-save and iptables-restore, or their -legacy/-nft variants)")
			}
			out, err := s.Version(ctx, ToolsOf("", false).IPTables)
			if err != nil {
				return nil, nil, fmt.Errorf("iptables --version: %w", err)
			}
			d.Plain = true
			d.Variant, d.Why = Legacy, "plain iptables, legacy by its --version"
			if strings.Contains(string(out), "nf_tables") {
				d.Variant, d.Why = NFT, "plain iptables, nf_tables by its --version"
			}
			d.Rules[d.Variant] = s.Usage(ctx, "").Rules
		}
	default:
		return nil, nil, fmt.Errorf("unknown iptables variant %q (want legacy or nft)", want)
	}
	d.Mismatch = d.Rules[Legacy] > 0 && d.Rules[NFT] > 0
	return d, usage, nil
}

// InUse lists the variants whose FORWARD chain must let pod traffic
// through: the one Detect chooses, and any other installed one that holds
// rules, a FORWARD policy of DROP (both variants' chains see every packet,
// so a DROP in either one drops it) or the overlay's chain from an earlier
// run. Each comes with the tools to
// program it. Nil when no iptables is installed.
func (s System) InUse(ctx context.Context) ([]Detection, error) {
	d, usage, err := s.detect(ctx, "")
	if err != nil {
		return nil, err
	}
	out := []Detection{*d}
	if d.Plain {
		return out, nil
	}
	for _, v := range []string{Legacy, NFT} {
		if v == d.Variant || !s.Installed(v) {
			continue
		}
		u, read := usage[v]
		if !read {
			u = s.Usage(ctx, v)
		}
		if u.NeedsForward() {
			out = append(out, Detection{Variant: v, Rules: d.Rules, Why: "it holds rules, a FORWARD policy of DROP or knit's chain too"})
		}
	}
	return out, nil
}
