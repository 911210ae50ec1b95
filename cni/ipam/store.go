package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"

	"golang.org/x/sys/unix"
)

// Store is the on-disk reservation store of one CNI network on this node.
// It holds no open files between calls: every Update takes the lock, reads,
// changes and writes, and lets go, so it is safe to use from short-lived
// plugin processes and from the long-running agent at the same time.
type Store struct {
	dir      string
	path     string // <dir>/<network>.json
	tmpPath  string // <dir>/<network>.json.tmp, only ever written under the lock
	lockPath string // <dir>/<network>.lock
}

// networkName is what CNI allows as a network name (libcni's
// ValidateNetworkName); checked again here because it becomes a file name.
var networkName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// Open returns the store of network under dir, creating dir if needed.
func Open(dir, network string) (*Store, error) {
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
		dir:      dir,
		path:     filepath.Join(dir, network+".json"),
		tmpPath:  filepath.Join(dir, network+".json.tmp"),
		lockPath: filepath.Join(dir, network+".lock"),
	}, nil
}

// Path is the state file.
func (s *Store) Path() string { return s.path }

// Update runs fn on the current state under the exclusive lock. If fn
// returns nil and changed the state, the new state is written atomically
// before the lock is released; if fn returns an error nothing is written, so
// fn's changes are rolled back with it.
func (s *Store) Update(fn func(*State) error) error {
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	st, err := s.read()
	if err != nil {
		return err
	}
	if err := fn(st); err != nil {
		return err
	}
	if !st.dirty {
		return nil
	}
	return s.write(st)
}

// View returns a snapshot of the state without taking the lock: the file is
// only ever replaced by rename, so a reader always sees one whole version.
func (s *Store) View() (*State, error) {
	return s.read()
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

// maxStateSize bounds what read accepts; a node's reservations are a few
// hundred entries of ~200 bytes.
const maxStateSize = 64 << 20

func (s *Store) read() (*State, error) {
	data, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return &State{Version: stateVersion}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ipam: read %s: %w", s.path, err)
	}
	return decodeState(data, s.path)
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

// write replaces the state file atomically and durably: temporary file,
// fdatasync, rename over the old file, fsync of the directory.
func (s *Store) write(st *State) error {
	st.Version = stateVersion
	if st.Reservations == nil {
		st.Reservations = []Reservation{}
	}
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("ipam: encode state: %w", err)
	}
	data = append(data, '\n')
	f, err := os.OpenFile(s.tmpPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("ipam: write state: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		// fdatasync also flushes the size of this freshly written file, which
		// is all a reader needs; mtime is not worth a second journal commit.
		err = unix.Fdatasync(int(f.Fd()))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(s.tmpPath)
		return fmt.Errorf("ipam: write state: %w", err)
	}
	if err := os.Rename(s.tmpPath, s.path); err != nil {
		os.Remove(s.tmpPath)
		return fmt.Errorf("ipam: write state: %w", err)
	}
	if d, err := os.Open(s.dir); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("ipam: sync state directory: %w", err)
		}
	}
	st.dirty = false
	return nil
}
