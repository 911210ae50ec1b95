// Command knit-controlplane is the lab's real Kubernetes control plane in one
// multi-call binary: etcd, kube-apiserver, kube-controller-manager and
// kube-proxy, each run through its upstream command code at a pinned version
// (see go.mod). It is a test fixture, not part of the knit product; it lives in
// a Go module of its own so that the product's go.mod does not inherit the
// dependency tree of k8s.io/kubernetes and etcd.
//
// Usage:
//
//	knit-controlplane etcd [etcd flags...]
//	knit-controlplane kube-apiserver [flags...]
//	knit-controlplane kube-controller-manager [flags...]
//	knit-controlplane kube-proxy [flags...]
//
// Linking the four into one binary saves about three link steps and several
// hundred megabytes of disk compared with four separate binaries. The launcher
// that configures and supervises these processes is knit.dev/knit/lab/cp.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"

	_ "time/tzdata" // CronJob time zones, as upstream's kube-apiserver and kube-controller-manager mains do.

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as in upstream mains.
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as in upstream mains.
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as in upstream mains.
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
)

// commands maps a first argument to the upstream entry point. Each returns the
// process exit code.
var commands = map[string]func() int{
	"etcd": func() int {
		// etcdmain.Main parses os.Args[1:] and exits on error itself.
		etcdmain.Main(os.Args)
		return 0
	},
	"kube-apiserver":          cobraMain(apiserver.NewAPIServerCommand),
	"kube-controller-manager": cobraMain(controllermanager.NewControllerManagerCommand),
	"kube-proxy":              cobraMain(proxy.NewProxyCommand),
}

func cobraMain(newCommand func() *cobra.Command) func() int {
	return func() int { return cli.Run(newCommand()) }
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := commands[name]; !ok {
		// Not invoked through a symlink named after a command: the first
		// argument names it.
		if len(os.Args) < 2 {
			usage()
			os.Exit(2)
		}
		name = os.Args[1]
		os.Args = os.Args[1:]
	}
	run, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "knit-controlplane: unknown command %q\n", name)
		usage()
		os.Exit(2)
	}
	// Upstream code reads os.Args (cobra's Execute, etcd's flag parsing), so
	// present it with the argv it would see as a standalone binary.
	os.Args[0] = name
	os.Exit(run())
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: knit-controlplane {%s} [flags...]\n", joinBar(names))
}

func joinBar(s []string) string {
	out := ""
	for i, v := range s {
		if i > 0 {
			out += "|"
		}
		out += v
	}
	return out
}
