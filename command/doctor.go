package command

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/urfave/cli/v2"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"knit.dev/knit/doctor"
	"knit.dev/knit/status"
)

// clusterFlags are the flags `knit status` and `knit doctor` share.
func clusterFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "kubeconfig", EnvVars: []string{"KUBECONFIG"}, Usage: "kubeconfig path; empty: the default loading rules (~/.kube/config), then in-cluster"},
		&cli.StringFlag{Name: "status-namespace", Value: status.DefaultNamespace, Usage: "namespace of knit's DaemonSet and node status Leases"},
		&cli.IntFlag{Name: "agent-port", Value: 9940, Usage: "agents' health port, for nodes whose Lease does not say"},
		&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Value: "table", Usage: "table or json"},
	}
}

func clusterEnv(c *cli.Context) (*doctor.Env, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if p := c.String("kubeconfig"); p != "" {
		rules.ExplicitPath = p
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &doctor.Env{
		Client:          client,
		Agents:          doctor.HTTPAgents{},
		StatusNamespace: c.String("status-namespace"),
		AgentPort:       c.Int("agent-port"),
		LocalAddrs:      doctor.LocalAddrs,
	}, nil
}

func writeOutput(w io.Writer, format string, v any, table func(io.Writer)) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "table", "text", "":
		table(w)
		return nil
	}
	return fmt.Errorf("--output: want table or json, got %q", format)
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show knit on every node: podCIDRs, overlay peers, Services programmed, DNS, ingress, last syncs and errors",
		Description: `From a kubeconfig, knit status reads the Nodes and the status Lease each agent
keeps in the status namespace (renewed every minute, rewritten when its
summary changes). Where it can reach an agent's health listener (agents bound
to a node address, or the local node's agent) it also shows that agent's full
/status: last sync time and error of each component, every overlay peer.`,
		Flags: clusterFlags(),
		Action: func(c *cli.Context) error {
			env, err := clusterEnv(c)
			if err != nil {
				return err
			}
			view, err := doctor.Status(c.Context, env)
			if err != nil {
				return err
			}
			return writeOutput(c.App.Writer, c.String("output"), view, view.WriteTable)
		},
	}
}

func doctorCommand() *cli.Command {
	flags := append(clusterFlags(),
		&cli.StringFlag{Name: "from", Usage: "where to probe from: node/<name>, pod/<name> (in the Service's namespace) or pod/<namespace>/<name>; default: every node with an endpoint and one without"},
	)
	return &cli.Command{
		Name:      "doctor",
		Usage:     "find out why a Service does not work: checks each hop in order and stops at the first broken one",
		ArgsUsage: "<namespace>/<service>",
		Description: `Checks, in order: the name resolves (and through which server); the Service
exists with a ClusterIP; its EndpointSlices have ready endpoints (and if not,
why: no pod matches the selector, pods not Ready, a targetPort naming no
port); knit runs and is synced on the nodes involved; the Service's rules are
in knit's nftables table there; connections from the node to the ClusterIP
and to every endpoint succeed; overlay routes to the endpoints' nodes exist
and full-size packets arrive. It stops at the first broken hop, says why and
what to try. Exit status 0: every check passed; 1: a check failed.`,
		Flags: flags,
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit("usage: knit doctor <namespace>/<service> [--from node/<name>|pod/<name>]", 2)
			}
			ns, name, ok := strings.Cut(c.Args().First(), "/")
			if !ok || ns == "" || name == "" {
				ns, name = "default", c.Args().First()
			}
			t := doctor.Target{Namespace: ns, Name: name}
			if from := c.String("from"); from != "" {
				kind, what, ok := strings.Cut(from, "/")
				switch {
				case !ok:
					t.FromNode = from
				case kind == "node":
					t.FromNode = what
				case kind == "pod":
					t.FromPod = what
				default:
					return cli.Exit(fmt.Sprintf("--from %q: want node/<name> or pod/<name>", from), 2)
				}
			}
			env, err := clusterEnv(c)
			if err != nil {
				return err
			}
			rep, err := doctor.Run(c.Context, env, t)
			if err != nil {
				return err
			}
			if err := writeOutput(c.App.Writer, c.String("output"), rep, rep.WriteText); err != nil {
				return err
			}
			if rep.Verdict != nil {
				return cli.Exit("", 1)
			}
			return nil
		},
	}
}
