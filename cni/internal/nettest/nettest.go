// Package nettest runs a package's tests inside a private sandbox, so that
// tests which touch the kernel (links, addresses, routes, sysctls, nftables)
// never touch the machine's real network namespace.
//
// Main re-executes the test binary under
//
//	unshare --net --mount --pid --fork --mount-proc --kill-child
//
// with KNIT_SANDBOX=1; inside, it makes every mount private, mounts a fresh
// tmpfs on /run (netns bind mounts, node.json, nft/xtables locks) and a
// sysfs that shows the sandbox's own links, and brings lo up. Every process
// the tests start dies with the sandbox.
//
// This is a stand-in for knit.dev/knit/lab/sandbox, which was not written
// yet when these tests were; switch to it once it exists.
package nettest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	envSandbox = "KNIT_SANDBOX"
	envReady   = "KNIT_SANDBOX_READY"
)

// InSandbox reports whether this process runs inside the test sandbox.
func InSandbox() bool { return os.Getenv(envSandbox) == "1" }

// Require stops a kernel-touching test unless it runs in the sandbox.
func Require(t testing.TB) {
	t.Helper()
	if !InSandbox() {
		t.Skip("needs the network sandbox (unshare as root); refusing to touch this machine's network")
	}
}

// Main is TestMain for packages with kernel tests. It does not return.
func Main(m *testing.M) {
	if !InSandbox() {
		os.Exit(reexec(m))
	}
	// Processes the tests start (fuzz workers, plugin runs) inherit the
	// environment and the sandbox; only its first process sets it up.
	if os.Getenv(envReady) != "1" {
		if err := setup(); err != nil {
			fmt.Fprintf(os.Stderr, "nettest: sandbox setup: %v\n", err)
			os.Exit(2)
		}
		os.Setenv(envReady, "1")
	}
	os.Exit(m.Run())
}

func reexec(m *testing.M) int {
	unshare, err := exec.LookPath("unshare")
	if err != nil || os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "nettest: not root or no unshare: kernel tests will be skipped")
		return m.Run()
	}
	args := append([]string{"--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", os.Args[0]}, os.Args[1:]...)
	cmd := exec.Command(unshare, args...)
	cmd.Env = append(os.Environ(), envSandbox+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		fmt.Fprintf(os.Stderr, "nettest: run sandbox: %v\n", err)
		return 2
	}
	return 0
}

func setup() error {
	// Refuse to set up anything unless this really is a fresh network
	// namespace: it holds exactly one link, lo.
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	if len(links) != 1 || links[0].Attrs().Name != "lo" {
		return fmt.Errorf("%s=1 but this network namespace has %d links: not a fresh sandbox", envSandbox, len(links))
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("tmpfs", "/run", "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("tmpfs on /run: %w", err)
	}
	if err := unix.Mount("sysfs", "/sys", "sysfs", 0, ""); err != nil {
		return fmt.Errorf("sysfs on /sys: %w", err)
	}
	if err := netlink.LinkSetUp(links[0]); err != nil {
		return err
	}
	// The net package probes IPv6 support once per process, on first use,
	// in whatever namespace that thread is in; a test that first listens
	// inside a pod namespace whose lo is down would leave the whole test
	// binary believing there is no IPv6. Probe here, with ::1 present.
	ln, err := net.Listen("tcp", "[::]:0")
	if err != nil {
		return err
	}
	return ln.Close()
}
