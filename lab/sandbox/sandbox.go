// Package sandbox owns the private network sandbox that every kernel-touching
// lab test and demo runs in, and the guard that keeps them out of the host's
// real network namespace.
//
// A sandbox is this program re-executed under
//
//	unshare --net --mount --pid --fork --mount-proc --kill-child
//
// so it has its own network namespace (no uplink: nothing can leave the
// machine), its own mount namespace and its own PID namespace (every process
// started inside dies with it). Setup then prepares the inside:
//
//	/            recursively private, so no mount leaks to the host
//	/run         private tmpfs (netns bind mounts, xtables lock, agent state)
//	/run/netns   shared bind mount, so agents in node netns see pod netns
//	/etc/netns   private tmpfs (per-netns resolv.conf for `ip netns exec`)
//	/sys         fresh sysfs, so /sys/class/net lists the sandbox's links
//	lo           up
//	knitu0       underlay bridge, 198.18.0.254/24, up (the control plane
//	             listens here; node N attaches as 198.18.0.N/24)
//
// The data flow is: parent process -> Enter (re-exec under unshare with
// KNIT_SANDBOX=1 and the host's netns identity in the environment) -> child
// process -> InSandbox (the env says sandbox and our netns differs from the
// host's) -> Setup. Code that touches links, addresses, routes, firewall rules
// or sysctls calls Check (or Require in tests) first and refuses to run
// outside.
//
// Typical use in a test package:
//
//	func TestMain(m *testing.M) { sandbox.Main(m) }
//
//	func TestSomething(t *testing.T) {
//		sandbox.Require(t) // skips unless in a set-up sandbox
//		...
//	}
package sandbox

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
)

const (
	// EnvSandbox is "1" in processes started by Enter.
	EnvSandbox = "KNIT_SANDBOX"
	// EnvHostNetNS holds the /proc/self/ns/net link of the process that
	// called Enter; InSandbox requires the current netns to differ from it.
	EnvHostNetNS = "KNIT_SANDBOX_HOST_NETNS"
	// envSetupDone is set once Setup prepared the sandbox, for children.
	envSetupDone = "KNIT_SANDBOX_SETUP_DONE"

	// UnderlayBridge is the underlay bridge Setup creates in the sandbox's
	// root netns.
	UnderlayBridge = "knitu0"
	// UnderlayCIDR is the bridge's address and prefix.
	UnderlayCIDR = "198.18.0.254/24"
	// ControlPlaneIP is the bridge's address; the lab control plane
	// advertises and listens on it.
	ControlPlaneIP = "198.18.0.254"
)

// unshareArgs are the unshare(1) flags that make a sandbox. --kill-child makes
// the sandbox's PID 1 (and so, through the PID namespace, every process in
// it) die when unshare dies.
var unshareArgs = []string{"--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"}

// ErrNotInSandbox is returned by Check and Setup outside a sandbox.
var ErrNotInSandbox = errors.New("sandbox: not inside a knit sandbox; refusing to touch networking (run through sandbox.Enter or sandbox.Main)")

// InSandbox reports whether this process runs inside a sandbox made by Enter:
// KNIT_SANDBOX=1 and a network namespace other than the one Enter was called
// from. The second condition keeps a stray KNIT_SANDBOX=1 in a shell from
// unlocking host networking.
func InSandbox() bool {
	if os.Getenv(EnvSandbox) != "1" {
		return false
	}
	host := os.Getenv(EnvHostNetNS)
	self, err := os.Readlink("/proc/self/ns/net")
	return err == nil && host != "" && self != host
}

// Check returns ErrNotInSandbox unless InSandbox. Call it before any change to
// links, addresses, routes, nftables/iptables rules or sysctls.
func Check() error {
	if !InSandbox() {
		return ErrNotInSandbox
	}
	return nil
}

// Available returns nil if Enter can make a sandbox here (running as root
// with unshare(1) installed), or an error saying why not.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("sandbox: needs root (unshare --net --mount)")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return fmt.Errorf("sandbox: unshare(1) not found: %w", err)
	}
	return nil
}

// Enter runs args (args[0] is the program) in a new sandbox with stdin,
// stdout and stderr inherited, waits for it and returns its exit status
// (128+signal if it was killed). The child sees KNIT_SANDBOX=1; it still has
// to call Setup. If this process dies, unshare gets SIGKILL and takes the
// whole sandbox with it.
func Enter(args ...string) (int, error) {
	if len(args) == 0 {
		return 0, errors.New("sandbox: Enter needs a command")
	}
	if err := Available(); err != nil {
		return 0, err
	}
	hostNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return 0, fmt.Errorf("sandbox: reading own netns: %w", err)
	}
	argv := append(append(append([]string{}, unshareArgs...), "--"), args...)
	cmd := exec.Command("unshare", argv...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(freshEnv(), EnvSandbox+"=1", EnvHostNetNS+"="+hostNS)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Run()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return exitErr.ExitCode(), nil
	}
	if err != nil {
		return 0, fmt.Errorf("sandbox: running %v: %w", argv, err)
	}
	return 0, nil
}

var (
	setupOnce sync.Once
	setupErr  error
)

// Setup prepares a fresh sandbox (mounts, lo, underlay bridge; see the package
// doc). It returns ErrNotInSandbox outside one. Only the first call does
// anything; later calls return the first call's result.
//
// The one change visible outside the sandbox: /etc/netns is created (empty) if
// missing, because a mount point must exist; ip-netns(8) does the same.
func Setup() error {
	if err := Check(); err != nil {
		return err
	}
	setupOnce.Do(func() {
		// A process started inside an already prepared sandbox (a
		// `go test -fuzz` worker, a lab agent) inherits this variable and
		// must not mount a second /run over the one its parent uses.
		if os.Getenv(envSetupDone) == "1" {
			return
		}
		if setupErr = setup(); setupErr == nil {
			os.Setenv(envSetupDone, "1")
		}
	})
	return setupErr
}

func setup() error {
	steps := []struct {
		what string
		do   func() error
	}{
		{"make / recursively private", func() error {
			return syscall.Mount("none", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, "")
		}},
		{"mount tmpfs on /run", func() error {
			return syscall.Mount("tmpfs", "/run", "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=0755")
		}},
		{"make /run/netns a shared mount point", func() error {
			if err := os.MkdirAll("/run/netns", 0o755); err != nil {
				return err
			}
			if err := syscall.Mount("/run/netns", "/run/netns", "", syscall.MS_BIND, ""); err != nil {
				return err
			}
			return syscall.Mount("none", "/run/netns", "", syscall.MS_SHARED, "")
		}},
		{"mount tmpfs on /etc/netns", func() error {
			if err := os.MkdirAll("/etc/netns", 0o755); err != nil {
				return err
			}
			return syscall.Mount("tmpfs", "/etc/netns", "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=0755")
		}},
		{"remount /sys for this netns", func() error {
			return syscall.Mount("sysfs", "/sys", "sysfs", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, "")
		}},
		{"bring lo up", func() error { return ip("link", "set", "lo", "up") }},
		{"create the underlay bridge", func() error {
			if err := ip("link", "add", UnderlayBridge, "type", "bridge"); err != nil {
				return err
			}
			if err := ip("addr", "add", UnderlayCIDR, "dev", UnderlayBridge); err != nil {
				return err
			}
			return ip("link", "set", UnderlayBridge, "up")
		}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("sandbox setup: %s: %w", s.what, err)
		}
	}
	slog.Debug("sandbox ready", "bridge", UnderlayBridge, "address", UnderlayCIDR)
	return nil
}

// ip runs ip(8). Setup shells out rather than using netlink so this package
// (imported by every lab test) pulls in no dependencies.
func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %v: %w: %s", args, err, out)
	}
	return nil
}

// Main is a TestMain body. Outside a sandbox, if one can be made, it re-runs
// the test binary with the same arguments inside a new sandbox and exits with
// its status. Inside, it runs Setup and then the tests. If no sandbox can be
// made (not root, no unshare), it runs the tests unsandboxed; tests that need
// the sandbox call Require and skip.
//
// Main calls os.Exit, as a TestMain does; it is meant for TestMain only.
//
// The sandbox has no route to the outside, so anything needing the network
// (e.g. downloading Go modules for a build) must run before Main.
func Main(m *testing.M) {
	if InSandbox() {
		if err := Setup(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(m.Run())
	}
	if err := Available(); err != nil {
		slog.Info("running tests without a sandbox; network tests will skip", "reason", err)
		os.Exit(m.Run())
	}
	code, err := Enter(os.Args...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(code)
}

// Require skips the test unless it runs inside a sandbox that Setup
// prepared successfully.
func Require(t testing.TB) {
	t.Helper()
	if !InSandbox() {
		reason := "not started through sandbox.Main/Enter"
		if err := Available(); err != nil {
			reason = err.Error()
		}
		t.Skipf("needs the network sandbox: %s", reason)
	}
	if err := Setup(); err != nil {
		t.Fatalf("sandbox setup: %v", err)
	}
}
