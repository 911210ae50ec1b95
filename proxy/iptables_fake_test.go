package proxy

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
)

// fakeIPT is one family's iptables for unit tests: it applies
// iptables-restore --noflush batches to tables in memory with the rules the
// real one enforces (a rule's chain and its jump target must exist; a chain
// must be empty and unreferenced to be deleted; each table commits
// atomically), and records every batch.
type fakeIPT struct {
	mu       sync.Mutex
	tables   map[string]map[string][]string // table -> chain -> rules
	batches  []string
	failNext error
}

var builtinChains = map[string][]string{
	iptTableMangle: {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	iptTableFilter: {"INPUT", "FORWARD", "OUTPUT"},
	iptTableNAT:    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
}

func newFakeIPT() *fakeIPT {
	f := &fakeIPT{tables: map[string]map[string][]string{}}
	for t, chains := range builtinChains {
		f.tables[t] = map[string][]string{}
		for _, c := range chains {
			f.tables[t][c] = nil
		}
	}
	return f
}

func (f *fakeIPT) randomFully() bool { return true }

func (f *fakeIPT) listChains(table string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Sorted(maps.Keys(f.tables[table])), nil
}

func (f *fakeIPT) chainExists(table, chain string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.tables[table][chain]
	return ok, nil
}

func (f *fakeIPT) ensureJumps(jumps []iptJump) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(jumps) - 1; i >= 0; i-- {
		j := jumps[i]
		rule := strings.Join(quoteArgs(j.args), " ")
		chains := f.tables[j.table]
		if _, ok := chains[j.chain]; !ok {
			return fmt.Errorf("no built-in chain %s %s", j.table, j.chain)
		}
		target := j.args[len(j.args)-1]
		if _, ok := chains[target]; !ok {
			return fmt.Errorf("jump to missing chain %s %s", j.table, target)
		}
		if !slices.Contains(chains[j.chain], rule) {
			chains[j.chain] = append([]string{rule}, chains[j.chain]...)
		}
	}
	return nil
}

func quoteArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.Contains(a, " ") {
			a = `"` + a + `"`
		}
		out[i] = a
	}
	return out
}

func (f *fakeIPT) restore(_ context.Context, data []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.batches = append(f.batches, string(data))
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	var table string
	var work map[string][]string
	for i, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		fail := func(format string, a ...any) error {
			return fmt.Errorf("line %d %q: %s", i+1, line, fmt.Sprintf(format, a...))
		}
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
			if f.tables[table] == nil {
				return fail("unknown table")
			}
			work = maps.Clone(f.tables[table])
		case line == "COMMIT":
			for c, rules := range work {
				for _, r := range rules {
					if t := jumpTarget(r); strings.HasPrefix(t, "KNIT-") {
						if _, ok := work[t]; !ok {
							return fail("chain %s jumps to missing chain %s", c, t)
						}
					}
				}
			}
			f.tables[table] = work
			work = nil
		case work == nil:
			return fail("outside a table")
		case strings.HasPrefix(line, ":"):
			name := strings.Fields(line[1:])[0]
			if len(name) > iptChainNameMax {
				return fail("chain name too long")
			}
			work[name] = nil
		case strings.HasPrefix(line, "-A "):
			fields := strings.SplitN(line, " ", 3)
			if _, ok := work[fields[1]]; !ok {
				return fail("no chain %s", fields[1])
			}
			if strings.Count(fields[2], `"`)%2 != 0 {
				return fail("unbalanced quotes")
			}
			work[fields[1]] = append(work[fields[1]], fields[2])
		case strings.HasPrefix(line, "-X "):
			name := line[3:]
			if _, ok := work[name]; !ok {
				return fail("no chain %s", name)
			}
			if len(work[name]) > 0 {
				return fail("chain %s not empty", name)
			}
			for c, rules := range work {
				for _, r := range rules {
					if jumpTarget(r) == name {
						return fail("chain %s still referenced by %s", name, c)
					}
				}
			}
			delete(work, name)
		default:
			return fail("unknown line")
		}
	}
	if work != nil {
		return fmt.Errorf("no COMMIT for table %s", table)
	}
	return nil
}

func jumpTarget(rule string) string {
	f := strings.Fields(rule)
	for i := range len(f) - 1 {
		if f[i] == "-j" {
			return f[i+1]
		}
	}
	return ""
}

// dump prints the tables: chains sorted by name, rules in order.
func (f *fakeIPT) dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	for _, t := range []string{iptTableMangle, iptTableFilter, iptTableNAT} {
		fmt.Fprintf(&b, "*%s\n", t)
		for _, c := range slices.Sorted(maps.Keys(f.tables[t])) {
			fmt.Fprintf(&b, ":%s\n", c)
			for _, r := range f.tables[t][c] {
				fmt.Fprintf(&b, "-A %s %s\n", c, r)
			}
		}
	}
	return b.String()
}
