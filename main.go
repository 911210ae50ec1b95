// Command knit is the whole networking layer of a Kubernetes cluster in one
// binary. All logic lives in importable packages; see package command for how
// argv[0] and CNI_COMMAND choose what the binary is.
package main

import (
	"os"

	"knit.dev/knit/command"
)

func main() {
	os.Exit(command.Main(os.Args, os.Stdin, os.Stdout, os.Stderr))
}
