package command

import (
	"io"
	"os"

	"knit.dev/knit/cni/plugin"
)

// runCNIPlugin runs the binary as a CNI plugin: the runtime set CNI_COMMAND
// and passes the network configuration on stdin.
func runCNIPlugin(stdin io.Reader, stdout, stderr io.Writer) int {
	return plugin.Main(stdin, stdout, stderr, os.Getenv)
}
