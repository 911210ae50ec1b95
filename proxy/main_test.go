package proxy

import (
	"os/exec"
	"testing"

	"knit.dev/knit/lab/sandbox"
)

// TestMain re-runs the test binary inside a private network sandbox
// (unshare --net --mount --pid ...), so that the kernel tests program nft and
// links in a throwaway network namespace, never in the machine's own. Unit
// tests with fakes run there too; they do not care.
func TestMain(m *testing.M) { sandbox.Main(m) }

// requireSandbox skips a kernel test unless it runs inside the sandbox.
func requireSandbox(t testing.TB) {
	t.Helper()
	sandbox.Require(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed (apt-get install -y nftables)")
	}
}
