// Command buildcp builds (or finds cached) the lab's control-plane binary, so
// that the test script can time that step on its own.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"knit.dev/knit/lab"
	"knit.dev/knit/lab/cp"
)

func main() {
	cache, err := lab.CacheDir()
	if err != nil {
		fmt.Fprintln(os.Stderr, "buildcp:", err)
		os.Exit(1)
	}
	start := time.Now()
	bin, err := cp.Build(context.Background(), cache)
	if err != nil {
		fmt.Fprintln(os.Stderr, "buildcp:", err)
		os.Exit(1)
	}
	fmt.Printf("control plane: %s (%v)\n", bin, time.Since(start).Round(time.Second))
}
