// Package testkit holds small helpers that the tests of several packages
// share. No production code imports it.
package testkit

import (
	"strings"
	"sync"
)

// SyncBuffer is an io.Writer safe for concurrent use, for capturing the
// log of a component whose goroutines write while the test reads.
type SyncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// StripIPTablesCounters drops iptables-save's comment lines (they carry
// timestamps) and the packet and byte counters of its chain lines (keeping
// name and policy), so that two listings of the same rules compare equal.
func StripIPTablesCounters(save string) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		if f := strings.Fields(l); strings.HasPrefix(l, ":") && len(f) >= 2 {
			l = f[0] + " " + f[1]
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}
