package command

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"knit.dev/knit/cluster"
	"knit.dev/knit/lab"
	"knit.dev/knit/lab/echo"
	"knit.dev/knit/lab/kubelet"
	"knit.dev/knit/lab/sandbox"
)

func labCommand() *cli.Command {
	return &cli.Command{
		Name:  "lab",
		Usage: "a real Kubernetes cluster with knit as its network, inside a private network sandbox",
		Subcommands: []*cli.Command{
			{
				Name:  "up",
				Usage: "start a lab cluster in the background and print how to use it",
				Flags: []cli.Flag{
					&cli.IntFlag{Name: "nodes", Value: 3},
					&cli.StringFlag{Name: "cni", Value: lab.CNIKnit, Usage: "knit or reference (bridge+host-local+portmap)"},
				},
				Action: labUp,
			},
			{Name: "down", Usage: "stop the lab cluster and remove everything it made", Action: labDown},
			{
				Name:            "exec",
				Usage:           "run a command inside the lab sandbox (KUBECONFIG set), e.g. knit lab exec -- bash",
				SkipFlagParsing: true,
				Action:          labExec,
			},
			{
				Name:  "demo",
				Usage: "bring up a 3-node lab, run pods and a Service, show traffic crossing nodes, tear down",
				Action: func(c *cli.Context) error {
					return runInSandbox(c, func(ctx context.Context) error {
						return lab.Demo(ctx, c.App.Writer, labLogger(c))
					})
				},
			},
			labKubeletCommand(),
			labEchoCommand(),
			{
				Name:      "get",
				Usage:     "HTTP GET a URL and print the body (used inside pod netns)",
				ArgsUsage: "URL",
				Action: func(c *cli.Context) error {
					client := &http.Client{Timeout: 5 * time.Second}
					resp, err := client.Get(c.Args().First())
					if err != nil {
						return err
					}
					defer resp.Body.Close()
					_, err = io.Copy(c.App.Writer, resp.Body)
					return err
				},
			},
			{
				Name:      "resolve",
				Usage:     "resolve a name with the system resolver (resolv.conf search path) and print the addresses",
				ArgsUsage: "NAME",
				Action: func(c *cli.Context) error {
					r := &net.Resolver{PreferGo: true}
					addrs, err := r.LookupHost(c.Context, c.Args().First())
					if err != nil {
						return err
					}
					fmt.Fprintln(c.App.Writer, strings.Join(addrs, " "))
					return nil
				},
			},
		},
	}
}

func labLogger(c *cli.Context) *slog.Logger {
	l, _ := newLogger(c.App.ErrWriter, "text", "info")
	return l
}

// runInSandbox runs fn inside a fresh network sandbox: when this process is
// not in one yet, it re-executes itself under unshare and waits.
func runInSandbox(c *cli.Context, fn func(ctx context.Context) error) error {
	if !sandbox.InSandbox() {
		code, err := sandbox.Enter(os.Args...)
		if err != nil {
			return err
		}
		if code != 0 {
			return cli.Exit("", code)
		}
		return nil
	}
	if err := sandbox.Setup(); err != nil {
		return err
	}
	ctx, stop := signalContext(c.Context)
	defer stop()
	return fn(ctx)
}

// Lab state files, under <cache>/lab.
func labStateDir() (string, error) {
	cache, err := lab.CacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "lab"), nil
}

func labUp(c *cli.Context) error {
	state, err := labStateDir()
	if err != nil {
		return err
	}
	if sandbox.InSandbox() {
		// The detached sandbox process: run the cluster until told to stop.
		if err := sandbox.Setup(); err != nil {
			return err
		}
		ctx, stop := signalContext(c.Context)
		defer stop()
		cl, err := lab.Up(ctx, lab.Options{Nodes: c.Int("nodes"), CNI: c.String("cni"), Log: labLogger(c)})
		if err != nil {
			return err
		}
		defer cl.Down()
		if err := os.WriteFile(filepath.Join(state, "ready"), []byte(cl.Kubeconfig()), 0o644); err != nil {
			return err
		}
		<-ctx.Done()
		return nil
	}
	if pid, err := labPID(state); err == nil {
		return fmt.Errorf("a lab is already running (pid %d); run `knit lab down` first", pid)
	}
	if err := os.MkdirAll(state, 0o755); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(state, "ready"))
	logPath := filepath.Join(state, "lab.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd, err := sandbox.Command(os.Args...)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(state, "pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fmt.Fprintf(c.App.Writer, "starting lab (log: %s) ...\n", logPath)
	for {
		select {
		case err := <-exited:
			_ = os.Remove(filepath.Join(state, "pid"))
			return fmt.Errorf("lab exited during start-up (%v); see %s", err, logPath)
		case <-time.After(500 * time.Millisecond):
		}
		kubeconfig, err := os.ReadFile(filepath.Join(state, "ready"))
		if err != nil {
			continue
		}
		fmt.Fprintf(c.App.Writer, `lab is up: %d nodes, knit as the network.
  shell inside the sandbox:  knit lab exec -- bash
  kubeconfig (inside):       %s
  a node's netns:            knit lab exec -- ip netns exec node1 bash
  stop and remove:           knit lab down
`, c.Int("nodes"), kubeconfig)
		return nil
	}
}

func labPID(state string) (int, error) {
	b, err := os.ReadFile(filepath.Join(state, "pid"))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, err
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return 0, fmt.Errorf("lab pid %d not running", pid)
	}
	return pid, nil
}

func labDown(c *cli.Context) error {
	state, err := labStateDir()
	if err != nil {
		return err
	}
	pid, err := labPID(state)
	if err != nil {
		fmt.Fprintln(c.App.Writer, "no lab running")
		_ = os.Remove(filepath.Join(state, "pid"))
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(30 * time.Second)
	for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if syscall.Kill(pid, 0) == nil {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	_ = os.Remove(filepath.Join(state, "pid"))
	_ = os.Remove(filepath.Join(state, "ready"))
	fmt.Fprintln(c.App.Writer, "lab stopped; the sandbox and everything in it are gone")
	return nil
}

func labExec(c *cli.Context) error {
	state, err := labStateDir()
	if err != nil {
		return err
	}
	pid, err := labPID(state)
	if err != nil {
		return errors.New("no lab running; start one with `knit lab up`")
	}
	inner, err := sandbox.InnerPID(pid)
	if err != nil {
		return err
	}
	kubeconfig, _ := os.ReadFile(filepath.Join(state, "ready"))
	args := c.Args().Slice()
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		args = []string{"bash"}
	}
	cmd := exec.Command("nsenter", append([]string{"--target", strconv.Itoa(inner), "--net", "--mount", "--pid", "--"}, args...)...)
	env, err := sandbox.JoinEnv()
	if err != nil {
		return err
	}
	cmd.Env = append(append(os.Environ(), "KUBECONFIG="+string(kubeconfig)), env...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, c.App.Writer, c.App.ErrWriter
	return cmd.Run()
}

func labKubeletCommand() *cli.Command {
	return &cli.Command{
		Name:   "kubelet",
		Usage:  "run a simulated kubelet for one lab node (started by the lab inside the node netns)",
		Hidden: true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "node-name", Required: true},
			&cli.StringFlag{Name: "node-ip", Required: true},
			&cli.StringFlag{Name: "kubeconfig", Required: true},
			&cli.StringFlag{Name: "cni-conf-dir", Required: true},
			&cli.StringFlag{Name: "cni-bin-dir", Required: true},
			&cli.StringFlag{Name: "cni-cache-dir", Required: true},
			&cli.StringFlag{Name: "cluster-dns", Value: lab.ClusterDNS},
			&cli.StringFlag{Name: "cluster-domain", Value: lab.ClusterDomain},
			&cli.StringFlag{Name: "workload", Required: true, Usage: "command that starts the echo workload"},
			&cli.DurationFlag{Name: "drain-delay", Value: time.Second},
		},
		Action: func(c *cli.Context) error {
			if !sandbox.InSandbox() {
				return errors.New("the lab kubelet runs only inside the lab sandbox")
			}
			log := labLogger(c)
			conn, err := cluster.Connect(c.String("kubeconfig"), log)
			if err != nil {
				return err
			}
			k := kubelet.New(kubelet.Config{
				NodeName:      c.String("node-name"),
				NodeIP:        c.String("node-ip"),
				CNIConfDir:    c.String("cni-conf-dir"),
				CNIBinDirs:    []string{c.String("cni-bin-dir")},
				CNICache:      c.String("cni-cache-dir"),
				Workload:      strings.Fields(c.String("workload")),
				ClusterDNS:    c.String("cluster-dns"),
				ClusterDomain: c.String("cluster-domain"),
				DrainDelay:    c.Duration("drain-delay"),
			}, conn.Client, log)
			ctx, stop := signalContext(c.Context)
			defer stop()
			return k.Run(ctx)
		},
	}
}

func labEchoCommand() *cli.Command {
	return &cli.Command{
		Name:   "echo",
		Usage:  "run the lab's echo workload (HTTP :8080, TCP :9000, UDP :9001)",
		Hidden: true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "pod"},
			&cli.StringFlag{Name: "namespace"},
			&cli.StringFlag{Name: "node"},
			&cli.BoolFlag{Name: "fail-readiness"},
		},
		Action: func(c *cli.Context) error {
			ctx, stop := signalContext(c.Context)
			defer stop()
			return echo.Serve(ctx, echo.Config{
				Pod: c.String("pod"), Namespace: c.String("namespace"), Node: c.String("node"),
				FailReadiness: c.Bool("fail-readiness"),
			}, labLogger(c))
		},
	}
}
