package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"

	"knit.dev/knit/internal/atomicfile"
)

// BootIDPath is where the kernel publishes the current boot's random ID.
const BootIDPath = "/proc/sys/kernel/random/boot_id"

// BootID returns the running kernel's boot ID, or "" if it cannot be read.
func BootID() string {
	b, err := os.ReadFile(BootIDPath)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Options tune a Store.
type Options struct {
	// Boot is the current kernel boot ID (see BootID). Empty turns reboot
	// detection off: reservations are then only ever released explicitly.
	Boot string
	// Durable fdatasyncs the state file and fsyncs the directory on every
	// write. Not needed for correctness (see the package comment).
	Durable bool
}

// Store is the on-disk reservation store of one CNI network on this node.
// It holds no open files between calls: every Update takes the lock, reads,
// changes and writes, and lets go, so it is safe to use from short-lived
// plugin processes and from the long-running agent at the same time.
type Store struct {
	opts     Options
	dir      string
	path     string // <dir>/<network>.json
	tmpPath  string // <dir>/<network>.json.tmp, only ever written under the lock
	bootPath string // <dir>/<network>.boot
	lockPath string // <dir>/<network>.lock
}

// networkName is what CNI allows as a network name (libcni's
// ValidateNetworkName); checked again here because it becomes a file name.
var networkName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// Open returns the store of network under dir, creating dir if needed.
func Open(dir, network string, opts Options) (*Store, error) {
	if !networkName.MatchString(network) || len(network) > 200 {
		return nil, fmt.Errorf("ipam: invalid network name %q", network)
	}
	if dir == "" {
		return nil, errors.New("ipam: empty state directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ipam: create state directory: %w", err)
	}
	return &Store{
		opts:     opts,
		dir:      dir,
		path:     filepath.Join(dir, network+".json"),
		tmpPath:  filepath.Join(dir, network+".json.tmp"),
		bootPath: filepath.Join(dir, network+".boot"),
		lockPath: filepath.Join(dir, network+".lock"),
	}, nil
}

// Path is the state file.
func (s *Store) Path() string { return s.path }

// Update runs fn on the current state under the exclusive lock. If fn
// returns nil and changed the state, the new state is written before the
// lock is released; if fn returns an error nothing is written, so fn's
// changes are rolled back with it. Reservations of an earlier boot are
// released before fn runs.
func (s *Store) Update(fn func(*State) error) error {
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	st, newBoot, err := s.load()
	if err != nil {
		return err
	}
	if err := fn(st); err != nil {
		return err
	}
	if st.dirty {
		if err := s.write(st); err != nil {
			return err
		}
	}
	if newBoot {
		// Only after the pruned state is in place: a crash in between
		// leaves the old boot ID, and the next writer prunes again.
		return s.writeBoot()
	}
	return nil
}

// View returns a snapshot of the state without taking the lock: the file is
// only ever replaced by rename, so a reader always sees one whole version.
// Reservations of an earlier boot are left out.
func (s *Store) View() (*State, error) {
	st, _, err := s.load()
	return st, err
}

// Retain releases, under the lock, every reservation for which keep returns
// false and returns the released ones. It is the agent's reconciliation
// entry point (the plugin's GC does the same inside its own Update).
func (s *Store) Retain(keep func(Reservation) bool) ([]Reservation, error) {
	var released []Reservation
	err := s.Update(func(st *State) error {
		released = st.Retain(keep)
		return nil
	})
	return released, err
}

// lock takes the exclusive flock on the lock file. The lock file is separate
// from the state file because the state file is replaced by rename, which
// would leave a lock holder locking a file nobody else opens.
func (s *Store) lock() (func(), error) {
	f, err := os.OpenFile(s.lockPath, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ipam: open lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ipam: lock %s: %w", s.lockPath, err)
	}
	// Closing the descriptor releases the flock.
	return func() { f.Close() }, nil
}

// maxStateSize bounds what load accepts; a node's reservations are a few
// hundred entries of ~200 bytes.
const maxStateSize = 64 << 20

// load reads the state. newBoot reports that it was written in an earlier
// boot (its reservations have been dropped, the caller should record the
// current boot once the pruned state is written).
func (s *Store) load() (st *State, newBoot bool, err error) {
	earlierBoot := false
	if s.opts.Boot != "" {
		b, err := os.ReadFile(s.bootPath)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			newBoot = true // first writer that knows the boot: adopt it
		case err != nil:
			return nil, false, fmt.Errorf("ipam: read %s: %w", s.bootPath, err)
		case strings.TrimSpace(string(b)) != s.opts.Boot:
			newBoot, earlierBoot = true, true
		}
	}
	data, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		st = &State{Version: stateVersion, dirty: earlierBoot}
		return st, newBoot, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("ipam: read %s: %w", s.path, err)
	}
	st, err = decodeState(data, s.path)
	if err != nil && !earlierBoot {
		return nil, false, err
	}
	if earlierBoot {
		// Every namespace of that boot is gone, and a file that does not
		// parse was torn by the crash that ended it.
		if st == nil {
			st = &State{Version: stateVersion}
		}
		st.Retain(func(Reservation) bool { return false })
		st.dirty = true
	}
	return st, newBoot, nil
}

// decodeState parses a state document. A document that does not parse is
// reported, never silently replaced: starting over would forget reservations
// of running pods and hand their addresses out again.
func decodeState(data []byte, name string) (*State, error) {
	if len(data) > maxStateSize {
		return nil, fmt.Errorf("ipam: %s: %d bytes is too large", name, len(data))
	}
	st := &State{}
	if err := json.Unmarshal(data, st); err != nil {
		return nil, fmt.Errorf("ipam: %s is corrupt (%v); move it away only once no pod on this node uses the network", name, err)
	}
	if err := st.validate(); err != nil {
		return nil, fmt.Errorf("ipam: %s is corrupt: %v", name, err)
	}
	return st, nil
}

// write replaces the state file: temporary file, rename over the old one
// (plus fdatasync and directory fsync when Durable).
func (s *Store) write(st *State) error {
	st.Version = stateVersion
	if st.Reservations == nil {
		st.Reservations = []Reservation{}
	}
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("ipam: encode state: %w", err)
	}
	if err := atomicfile.Write(s.path, append(data, '\n'), atomicfile.Options{Temp: s.tmpPath, NoSync: !s.opts.Durable}); err != nil {
		return fmt.Errorf("ipam: write state: %w", err)
	}
	st.dirty = false
	return nil
}

// writeBoot records the current boot ID, durably: everything written
// without fsync in this boot relies on it.
func (s *Store) writeBoot() error {
	if err := atomicfile.Write(s.bootPath, []byte(s.opts.Boot+"\n"), atomicfile.Options{Temp: s.bootPath + ".tmp"}); err != nil {
		return fmt.Errorf("ipam: record boot ID: %w", err)
	}
	return nil
}
