package command

import (
	"fmt"
	"os"
	"sort"

	"github.com/urfave/cli/v2"

	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/uninstall"
)

// symlinkNames are the knit-* links to the binary that install-cni puts
// next to the plugin and uninstall removes: every name Dispatch knows.
func symlinkNames() []string {
	names := []string{"knit-agent"}
	for n := range roleSymlinks {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func uninstallCommand() *cli.Command {
	return &cli.Command{
		Name:  "uninstall",
		Usage: "remove what knit left on this node (interfaces, proto 75 routes, nftables tables, the overlay's iptables FORWARD chain, CNI files), and only that",
		Description: `Run on the node (as root, in the host network namespace) after deleting
knit's DaemonSet. Without --yes it only lists what it would remove. Pods
still running on the node lose their network.`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "yes", Usage: "really remove (without it: list only)"},
			&cli.StringFlag{Name: "cluster-dns", Value: "10.43.0.10", Usage: "the agent's --cluster-dns: these addresses are removed from lo"},
			&cli.StringFlag{Name: "run-dir", Value: plugin.DefaultRunDir},
			&cli.StringFlag{Name: "cni-conf-dir", Value: plugin.DefaultConfDir},
			&cli.StringFlag{Name: "cni-bin-dir", Value: plugin.DefaultBinDir},
		},
		Action: func(c *cli.Context) error {
			cfg := uninstall.Config{
				RunDir:     c.String("run-dir"),
				CNIConfDir: c.String("cni-conf-dir"),
				CNIBinDir:  c.String("cni-bin-dir"),
				Symlinks:   symlinkNames(),
			}
			var err error
			if cfg.ClusterDNS, err = parseAddrs("cluster-dns", c.String("cluster-dns")); err != nil {
				return err
			}
			steps, planErr := uninstall.Plan(c.Context, cfg)
			w := c.App.Writer
			if len(steps) == 0 {
				fmt.Fprintln(w, "nothing of knit's found on this node")
				return planErr
			}
			if !c.Bool("yes") {
				fmt.Fprintln(w, "would remove:")
				for _, s := range steps {
					fmt.Fprintln(w, "  "+s.What)
				}
				if planErr != nil {
					fmt.Fprintf(w, "and could not inspect: %v\n", planErr)
				}
				return cli.Exit("refusing to remove anything without --yes", 1)
			}
			for _, s := range steps {
				fmt.Fprintln(w, "removing "+s.What)
			}
			if err := uninstall.Apply(steps); err != nil {
				return fmt.Errorf("uninstall: %w", err)
			}
			return planErr
		},
	}
}

// installCNICommand is the DaemonSet's init step: the CNI plugin into the
// host's CNI bin dir. The plugin is knit-cni when the image ships it beside
// this binary (as the agent's own install step picks it, see
// defaultPluginBinary), else this multi-call binary plus its knit-*
// symlinks; role symlinks to the plugin-only build would not run the roles.
func installCNICommand() *cli.Command {
	return &cli.Command{
		Name:  "install-cni",
		Usage: "copy the CNI plugin (knit-cni beside this binary, else this binary with its knit-* symlinks) into the CNI bin dir as knit (the DaemonSet's init container)",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "cni-bin-dir", Value: plugin.DefaultBinDir},
		},
		Action: func(c *cli.Context) error {
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			src, links := defaultPluginBinary(), symlinkNames()
			if src != exe {
				links = nil
			}
			dir := c.String("cni-bin-dir")
			if err := uninstall.InstallBinary(src, dir, links); err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "installed %s into %s as %s, symlinks %v\n", src, dir, plugin.PluginType, links)
			return nil
		},
	}
}
