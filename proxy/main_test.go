package proxy

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"testing"
)

// TestMain re-runs the test binary inside a private sandbox
// (unshare --net --mount --pid ...) so that the kernel tests program nft in a
// throwaway network namespace, never in the machine's own. Unit tests with
// fakes run there too; they do not care.
//
// TODO: switch to knit.dev/knit/lab/sandbox's sandbox.Main(m) once that
// package exists; this is the same re-exec it is specified to do.
func TestMain(m *testing.M) {
	if os.Getenv("KNIT_SANDBOX") == "" && os.Geteuid() == 0 {
		if path, err := exec.LookPath("unshare"); err == nil && exec.Command(path, "--net", "true").Run() == nil {
			args := append([]string{"--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", os.Args[0]}, os.Args[1:]...)
			cmd := exec.Command(path, args...)
			cmd.Env = append(os.Environ(), "KNIT_SANDBOX=1")
			cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
			err := cmd.Run()
			var exit *exec.ExitError
			switch {
			case errors.As(err, &exit):
				os.Exit(exit.ExitCode())
			case err != nil:
				os.Stderr.WriteString("sandbox: " + err.Error() + "\n")
				os.Exit(1)
			}
			os.Exit(0)
		}
	}
	os.Exit(m.Run())
}

// requireSandbox skips a kernel test unless it runs in a fresh network
// namespace made by TestMain: the only link there is lo.
func requireSandbox(t testing.TB) {
	t.Helper()
	if os.Getenv("KNIT_SANDBOX") != "1" {
		t.Skip("kernel test: needs the unshare sandbox (run as root)")
	}
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatalf("list interfaces: %v", err)
	}
	if len(ifs) != 1 || ifs[0].Name != "lo" {
		t.Fatalf("refusing to touch the kernel: not in a fresh network namespace (links: %v)", ifs)
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed (apt-get install -y nftables)")
	}
}
