package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as a helper process: with KNIT_IPAM_CHILD set it
// runs one of the child modes below instead of the tests.
func TestMain(m *testing.M) {
	switch os.Getenv("KNIT_IPAM_CHILD") {
	case "":
		os.Exit(m.Run())
	case "alloc":
		os.Exit(childAlloc())
	case "churn":
		os.Exit(childChurn())
	}
	os.Exit(3)
}

var testPool = []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24"), netip.MustParsePrefix("fd42:0:0:1::/64")}

// childAlloc allocates one reservation for KNIT_IPAM_ID and prints its IPs.
func childAlloc() int {
	s, err := Open(os.Getenv("KNIT_IPAM_DIR"), "knit", Options{Boot: "b"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var r Reservation
	err = s.Update(func(st *State) error {
		var err error
		r, err = st.Allocate(Request{Attachment: Attachment{os.Getenv("KNIT_IPAM_ID"), "eth0"}, Now: time.Now()}, testPool)
		return err
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(r.IPs[0], r.IPs[1])
	return 0
}

// childChurn allocates and releases forever, to be killed at a random moment.
func childChurn() int {
	s, err := Open(os.Getenv("KNIT_IPAM_DIR"), "knit", Options{Boot: "b"})
	if err != nil {
		return 1
	}
	for i := 0; ; i++ {
		id := fmt.Sprintf("churn-%d", i%40)
		_ = s.Update(func(st *State) error {
			if _, ok := st.Release(Attachment{id, "eth0"}); ok {
				return nil
			}
			_, err := st.Allocate(Request{Attachment: Attachment{id, "eth0"}, Now: time.Now(), Pod: PodRef{Namespace: "ns", Name: id}}, testPool)
			return err
		})
	}
}

func TestStoreRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, "knit", Options{Boot: "b"})
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.View()
	if err != nil || len(st.Reservations) != 0 {
		t.Fatalf("empty store: %v %v", st, err)
	}
	want := Request{Attachment: Attachment{"abc", "eth0"}, Netns: "/run/netns/p", Now: t0,
		Pod:          PodRef{Namespace: "default", Name: "web", UID: "u-1"},
		PortMappings: []PortMapping{{HostPort: 8080, ContainerPort: 80, Protocol: "tcp", HostIP: netip.MustParseAddr("198.18.0.1")}}}
	if err := s.Update(func(st *State) error {
		_, err := st.Allocate(want, testPool)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	st, err = s.View()
	if err != nil {
		t.Fatal(err)
	}
	r := st.Find(want.Attachment)
	if r == nil || r.Pod != want.Pod || r.Netns != want.Netns || !r.Created.Equal(t0) ||
		fmt.Sprint(r.IPs) != "[10.42.1.2 fd42:0:0:1::2]" || fmt.Sprint(r.PortMappings) != fmt.Sprint(want.PortMappings) {
		t.Fatalf("read back %+v", r)
	}
	if _, err := os.Stat(filepath.Join(dir, "knit.json.tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary file left behind: %v", err)
	}
	fi, err := os.Stat(s.Path())
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, %v", fi.Mode(), err)
	}
}

func TestDurableWrites(t *testing.T) {
	s, _ := Open(t.TempDir(), "knit", Options{Boot: "b", Durable: true})
	if err := s.Update(func(st *State) error {
		_, err := st.Allocate(Request{Attachment: Attachment{"a", "eth0"}}, testPool)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if st, err := s.View(); err != nil || len(st.Reservations) != 1 {
		t.Fatalf("%v %v", st, err)
	}
}

// TestRebootReleasesEverything: the first writer of a new boot drops the
// reservations of the previous one, readers never see them, and a state
// that an earlier boot's crash tore is dropped instead of reported.
func TestRebootReleasesEverything(t *testing.T) {
	dir := t.TempDir()
	alloc := func(s *Store, id string) {
		t.Helper()
		if err := s.Update(func(st *State) error {
			_, err := st.Allocate(Request{Attachment: Attachment{id, "eth0"}}, testPool)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	count := func(s *Store) int {
		t.Helper()
		st, err := s.View()
		if err != nil {
			t.Fatal(err)
		}
		return len(st.Reservations)
	}

	// A store written without a boot ID is adopted, not pruned.
	legacy, _ := Open(dir, "knit", Options{})
	alloc(legacy, "legacy")
	boot1, _ := Open(dir, "knit", Options{Boot: "boot-1"})
	alloc(boot1, "a")
	if n := count(boot1); n != 2 {
		t.Fatalf("boot-1 sees %d reservations, want 2", n)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "knit.boot")); string(b) != "boot-1\n" {
		t.Fatalf("boot file %q", b)
	}

	boot2, _ := Open(dir, "knit", Options{Boot: "boot-2"})
	if n := count(boot2); n != 0 {
		t.Fatalf("boot-2 reader sees %d reservations of boot-1", n)
	}
	alloc(boot2, "b")
	if n := count(boot2); n != 1 {
		t.Fatalf("boot-2 has %d reservations, want 1", n)
	}
	if n := count(boot1); n != 0 {
		t.Fatal("boot-1 view of a boot-2 store should be empty too")
	}

	// Torn by the crash that ended boot-2: dropped in boot-3...
	os.WriteFile(filepath.Join(dir, "knit.json"), []byte(`{"version":1,"reserv`), 0o600)
	boot3, _ := Open(dir, "knit", Options{Boot: "boot-3"})
	if n := count(boot3); n != 0 {
		t.Fatalf("torn earlier-boot state: %d reservations", n)
	}
	alloc(boot3, "c")
	// ...but a torn file of the current boot is reported, never replaced.
	os.WriteFile(filepath.Join(dir, "knit.json"), []byte(`{"version":1,"reserv`), 0o600)
	if err := boot3.Update(func(*State) error { return nil }); err == nil {
		t.Fatal("torn state of the current boot accepted")
	}
}

func TestUpdateErrorWritesNothing(t *testing.T) {
	s, _ := Open(t.TempDir(), "knit", Options{})
	boom := errors.New("boom")
	err := s.Update(func(st *State) error {
		if _, err := st.Allocate(Request{Attachment: Attachment{"a", "eth0"}}, testPool); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(s.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state written despite the error: %v", err)
	}
}

func TestCorruptStateIsReportedNotReplaced(t *testing.T) {
	for name, content := range map[string]string{
		"torn":           `{"version":1,"reservations":[{"containerID":"a"`,
		"empty":          ``,
		"future version": `{"version":9,"reservations":[]}`,
		"duplicate IP":   `{"version":1,"reservations":[{"containerID":"a","ifname":"eth0","ips":["10.42.1.2"]},{"containerID":"b","ifname":"eth0","ips":["10.42.1.2"]}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			s, _ := Open(t.TempDir(), "knit", Options{})
			if err := os.WriteFile(s.Path(), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			err := s.Update(func(st *State) error { return nil })
			if err == nil {
				t.Fatal("corrupt state accepted")
			}
			b, _ := os.ReadFile(s.Path())
			if string(b) != content {
				t.Fatal("corrupt state was overwritten")
			}
		})
	}
}

func TestOpenRejectsBadNetworkNames(t *testing.T) {
	for _, n := range []string{"", "../x", ".hidden", "a/b", "a b"} {
		if _, err := Open(t.TempDir(), n, Options{}); err == nil {
			t.Errorf("Open(%q) accepted", n)
		}
	}
}

// TestConcurrentAllocationsNeverDuplicate runs 16 allocations at once in
// separate processes (each its own flock holder) plus 16 goroutines with
// separate Store values, and checks every address is handed out once.
func TestConcurrentAllocationsNeverDuplicate(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[string]string{}
	record := func(id, ips string) {
		mu.Lock()
		defer mu.Unlock()
		for _, ip := range strings.Fields(ips) {
			if other, dup := seen[ip]; dup {
				t.Errorf("%s handed to %s and %s", ip, other, id)
			}
			seen[ip] = id
		}
	}
	for i := range 16 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			id := fmt.Sprint("proc-", i)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "KNIT_IPAM_CHILD=alloc", "KNIT_IPAM_DIR="+dir, "KNIT_IPAM_ID="+id)
			out, err := cmd.Output()
			if err != nil {
				t.Errorf("%s: %v", id, err)
				return
			}
			record(id, string(out))
		}()
		go func() {
			defer wg.Done()
			id := fmt.Sprint("goroutine-", i)
			s, err := Open(dir, "knit", Options{Boot: "b"})
			if err != nil {
				t.Error(err)
				return
			}
			var r Reservation
			if err := s.Update(func(st *State) error {
				var err error
				r, err = st.Allocate(Request{Attachment: Attachment{id, "eth0"}}, testPool)
				return err
			}); err != nil {
				t.Error(err)
				return
			}
			record(id, fmt.Sprintln(r.IPs[0], r.IPs[1]))
		}()
	}
	wg.Wait()
	s, _ := Open(dir, "knit", Options{Boot: "b"})
	st, err := s.View()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Reservations) != 32 || len(seen) != 64 {
		t.Fatalf("%d reservations, %d distinct addresses; want 32 and 64", len(st.Reservations), len(seen))
	}
}

// TestKill9NeverCorrupts kills a process that allocates and releases in a
// tight loop at random moments, and checks after every kill that the store
// still parses and holds no duplicate.
func TestKill9NeverCorrupts(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	dir := t.TempDir()
	s, _ := Open(dir, "knit", Options{Boot: "b"})
	for round := range 15 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "KNIT_IPAM_CHILD=churn", "KNIT_IPAM_DIR="+dir)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(20+rand.IntN(60)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		st, err := s.View()
		if err != nil {
			t.Fatalf("round %d: store unreadable after kill -9: %v", round, err)
		}
		// The next writer must also cope with a leftover temporary file.
		if err := s.Update(func(st *State) error {
			_, err := st.Allocate(Request{Attachment: Attachment{"probe-" + strconv.Itoa(round), "eth0"}}, testPool)
			return err
		}); err != nil {
			t.Fatalf("round %d: update after kill -9: %v", round, err)
		}
		_ = st
	}
	b, _ := os.ReadFile(s.Path())
	if !json.Valid(b) {
		t.Fatal("final state is not JSON")
	}
}

// BenchmarkUpdate measures one allocate-or-release cycle (flock, read,
// decode, encode, write, rename) with 200 pods' reservations in the store.
func BenchmarkUpdate(b *testing.B) {
	b.Run("default", func(b *testing.B) { benchmarkUpdate(b, Options{Boot: "b"}) })
	b.Run("durable", func(b *testing.B) { benchmarkUpdate(b, Options{Boot: "b", Durable: true}) })
}

func benchmarkUpdate(b *testing.B, opts Options) {
	s, _ := Open(b.TempDir(), "knit", opts)
	_ = s.Update(func(st *State) error {
		for i := range 200 {
			if _, err := st.Allocate(Request{Attachment: Attachment{fmt.Sprint("fill-", i), "eth0"}, Pod: PodRef{"default", fmt.Sprint("pod-", i), "0123456789abcdef"}}, testPool); err != nil {
				return err
			}
		}
		return nil
	})
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		a := Attachment{"bench", "eth0"}
		_ = s.Update(func(st *State) error {
			if _, ok := st.Release(a); ok {
				return nil
			}
			_, err := st.Allocate(Request{Attachment: a}, testPool)
			return err
		})
	}
}

func FuzzDecodeState(f *testing.F) {
	f.Add([]byte(`{"version":1,"last":{"10.42.1.0/24":"10.42.1.9"},"reservations":[{"containerID":"a","ifname":"eth0","ips":["10.42.1.9","fd42::9"],"created":"2025-01-01T00:00:00Z","pod":{"namespace":"d","name":"p","uid":"u"},"portMappings":[{"hostPort":80,"containerPort":8080,"protocol":"tcp"}]}]}`))
	f.Add([]byte(`{"version":1,"reservations":[]}`))
	f.Add([]byte(`{"version":1,"reservations":[{"containerID":"","ifname":"eth0"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := decodeState(data, "fuzz")
		if err != nil {
			return
		}
		// A decoded state must survive what the plugin does with it.
		_, _ = st.Allocate(Request{Attachment: Attachment{"fz", "eth0"}}, testPool)
		st.Release(Attachment{"a", "eth0"})
		st.Retain(func(r Reservation) bool { return len(r.IPs) > 1 })
		if err := st.validate(); err != nil {
			t.Fatalf("state invalid after operations: %v", err)
		}
	})
}
