package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The agent's own footprint (docs/benchmarks.md, "Memory"). Two things
// besides the cache's contents decide it.
//
// The binary's pages. An idle agent's RSS is mostly file-backed pages of
// its own binary, touched once while the runtime initialised the packages
// linked in (client-go links every API group, and each group's package
// initialisation runs) and faulted in 64 KiB at a time (the kernel's
// fault-around). They are clean and shared with the page cache, but they
// count in RSS and in the memory the node shows for the agent for as long
// as they stay mapped. With ReleaseStartupPages the agent, once every
// component is Ready, unmaps its binary's read-only pages (code, read-only
// data, function tables) with madvise(MADV_DONTNEED); what it still uses is
// faulted back in from the page cache (minor faults, no I/O) and the rest
// becomes ordinary unmapped page cache, the first thing the kernel
// reclaims.
//
// The Go heap. By default (GOGC=100) the collector lets the heap grow to
// twice the live data before it runs; the agent's default is
// defaultGCPercent, so the heap stays within 1.25 times the live data.
// The agent allocates little once synced (watch events; DNS answers are
// prepacked), so collecting more often costs little CPU there (measured:
// 0.06-0.08 s of CPU in 50 s idle at 1,000 Services, whatever GOGC);
// under heavy churn each allocated byte costs about four times the
// collector work of GOGC=100. GOGC or --gc-percent override it.
//
// MemoryLimit is the runtime's soft limit (runtime/debug.SetMemoryLimit,
// the same as GOMEMLIMIT): near it the collector runs more often still. It
// is off by default: a fixed limit below what a large cluster's live data
// needs would make the collector run continuously (up to half the CPU);
// set it (or GOMEMLIMIT) to about the container's memory limit.

// defaultGCPercent is the agent's GOGC unless told otherwise.
const defaultGCPercent = 25

// tuneGC applies GCPercent and MemoryLimit.
func (a *Agent) tuneGC() {
	switch {
	case a.cfg.GCPercent > 0:
		debug.SetGCPercent(a.cfg.GCPercent)
	case os.Getenv("GOGC") == "":
		debug.SetGCPercent(defaultGCPercent)
	}
	if a.cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(a.cfg.MemoryLimit)
	}
}

// releaseDelay is how long after the agent first became Ready it releases
// its start-up pages: the informers' initial lists and the components'
// first full syncs are done by then.
const releaseDelay = 10 * time.Second

// releaseStartupPagesWhenReady waits until every component is Ready, then
// releaseDelay, then releases the binary's start-up pages once.
func (a *Agent) releaseStartupPagesWhenReady(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for len(a.notReady()) > 0 {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(releaseDelay):
	}
	n, err := releaseStartupPages()
	if err != nil {
		a.log.Warn("releasing start-up pages", "err", err)
		return
	}
	a.log.Info("released the binary's start-up pages", "bytes", n)
}

// releaseStartupPages unmaps this process's read-only mappings of its own
// binary with MADV_DONTNEED and returns how many resident bytes they held.
// Only mappings without anonymous pages qualify: a private file mapping
// whose pages were ever written (a PIE binary's RELRO segment is read-only
// but written once by the loader) would lose the writes.
func releaseStartupPages() (int64, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, err
	}
	raw, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return 0, err
	}
	maps, err := parseSmaps(string(raw))
	if err != nil {
		return 0, err
	}
	var released int64
	var errs []error
	for _, m := range maps {
		if m.path != exe || (m.perms != "r-xp" && m.perms != "r--p") || m.anon != 0 {
			continue
		}
		if _, _, e := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_DONTNEED); e != 0 {
			errs = append(errs, fmt.Errorf("madvise %x-%x: %w", m.start, m.end, e))
			continue
		}
		released += m.rss
	}
	return released, errors.Join(errs...)
}

// mapping is one entry of /proc/<pid>/smaps.
type mapping struct {
	start, end uintptr
	perms      string
	path       string
	rss, anon  int64 // bytes
}

// parseSmaps reads the mappings of an smaps file: a header line per mapping
// ("start-end perms offset dev inode [path]") followed by "Key: value kB"
// lines.
func parseSmaps(s string) ([]mapping, error) {
	var out []mapping
	for line := range strings.Lines(s) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if !strings.HasSuffix(f[0], ":") {
			if len(f) < 5 {
				return nil, fmt.Errorf("smaps: malformed line %q", line)
			}
			lo, hi, ok := strings.Cut(f[0], "-")
			a, err1 := strconv.ParseUint(lo, 16, 64)
			b, err2 := strconv.ParseUint(hi, 16, 64)
			if !ok || err1 != nil || err2 != nil {
				return nil, fmt.Errorf("smaps: malformed range %q", f[0])
			}
			m := mapping{start: uintptr(a), end: uintptr(b), perms: f[1]}
			if len(f) >= 6 {
				// The path may hold spaces (" (deleted)").
				m.path = strings.Join(f[5:], " ")
			}
			out = append(out, m)
			continue
		}
		if len(out) == 0 || len(f) < 2 {
			continue
		}
		var dst *int64
		switch f[0] {
		case "Rss:":
			dst = &out[len(out)-1].rss
		case "Anonymous:":
			dst = &out[len(out)-1].anon
		default:
			continue
		}
		kb, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("smaps: %q: %w", line, err)
		}
		*dst = kb << 10
	}
	return out, nil
}
