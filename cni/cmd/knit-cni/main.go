// Command knit-cni is the CNI plugin alone, without the rest of knit.
//
// The knit multi-call binary runs the same plugin when the runtime executes
// it with CNI_COMMAND set, but it links client-go and the other components,
// whose package initialisation costs the plugin several milliseconds per
// call. Installing this binary as <CNI bin dir>/knit keeps ADD and DEL to
// what the plugin itself does.
package main

import (
	"os"

	"knit.dev/knit/cni/plugin"
)

func main() {
	os.Exit(plugin.Main(os.Stdin, os.Stdout, os.Stderr, os.Getenv))
}
