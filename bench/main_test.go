package bench

import (
	"testing"

	"knit.dev/knit/lab/sandbox"
)

// TestMain re-runs the test binary inside a new network sandbox; every
// benchmark of the package runs there (and calls sandbox.Require).
func TestMain(m *testing.M) { sandbox.Main(m) }
