// Package command is knit's command line: it turns argv into a call of one of
// the importable packages, and nothing more. main.go calls Main.
//
// One binary, several personalities, chosen from argv[0]:
//
//	CNI_COMMAND set     -> the CNI plugin (the container runtime ran us)
//	knit-agent          -> knit agent (all components)
//	knit-proxy, knit-overlay, knit-dns, knit-ingress
//	                    -> knit agent with only that component enabled
//	knit (anything else)-> the CLI: agent, lab, version, ...
package command

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"
)

// Version is set at build time with -ldflags "-X knit.dev/knit/command.Version=...".
var Version = "dev"

// Role is what an invocation of the binary is asked to be.
type Role struct {
	// CNI is true when the container runtime runs the binary as a plugin.
	CNI bool
	// Args are the CLI arguments to run (argv[0] first) when CNI is false.
	Args []string
}

// roleSymlinks maps a symlink name to the single component it runs.
var roleSymlinks = map[string]string{
	"knit-proxy":   "proxy",
	"knit-overlay": "overlay",
	"knit-dns":     "dns",
	"knit-ingress": "ingress",
}

// Dispatch decides what the binary is from argv and the environment. It is
// pure so that it can be tested without running anything.
func Dispatch(argv []string, getenv func(string) string) Role {
	if getenv("CNI_COMMAND") != "" {
		return Role{CNI: true}
	}
	if len(argv) == 0 {
		return Role{Args: []string{"knit"}}
	}
	name := filepath.Base(argv[0])
	rest := argv[1:]
	if name == "knit-agent" {
		return Role{Args: append([]string{"knit", "agent"}, rest...)}
	}
	if comp, ok := roleSymlinks[name]; ok {
		return Role{Args: append([]string{"knit", "agent", "--components=" + comp}, rest...)}
	}
	return Role{Args: append([]string{"knit"}, rest...)}
}

// Main runs the binary and returns its exit status.
func Main(argv []string, stdin io.Reader, stdout, stderr io.Writer) int {
	role := Dispatch(argv, os.Getenv)
	if role.CNI {
		return runCNIPlugin(stdin, stdout, stderr)
	}
	role.Args = flagsFirst(role.Args)
	app := NewApp(stdout, stderr)
	app.ExitErrHandler = func(*cli.Context, error) {} // Main decides the exit status
	if err := app.RunContext(context.Background(), role.Args); err != nil {
		var coder cli.ExitCoder
		if errors.As(err, &coder) {
			if msg := err.Error(); msg != "" {
				fmt.Fprintf(stderr, "knit: %s\n", msg)
			}
			return coder.ExitCode()
		}
		fmt.Fprintf(stderr, "knit: %v\n", err)
		return 1
	}
	return 0
}

// NewApp builds the CLI.
func NewApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:      "knit",
		Usage:     "the whole networking layer of a Kubernetes cluster in one binary",
		Version:   Version,
		Writer:    stdout,
		ErrWriter: stderr,
		Commands: []*cli.Command{
			agentCommand(),
			labCommand(),
			manifestCommand(),
			uninstallCommand(),
			installCNICommand(),
			statusCommand(),
			doctorCommand(),
			{
				Name:  "version",
				Usage: "print the version",
				Action: func(c *cli.Context) error {
					fmt.Fprintln(c.App.Writer, "knit", Version)
					return nil
				},
			},
		},
		HideHelpCommand: true,
	}
}

// splitList parses a comma-separated flag value.
func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// flagsFirst lets `knit doctor ns/svc --from node/x` work: urfave/cli v2
// stops parsing flags at the first argument, so for the commands whose
// flags all take a value (doctor), flags after the argument are moved
// before it.
func flagsFirst(args []string) []string {
	if len(args) < 3 || args[1] != "doctor" {
		return args
	}
	var flags, rest []string
	for i := 2; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			rest = append(rest, args[i:]...)
			i = len(args)
		case strings.HasPrefix(a, "-") && a != "-":
			flags = append(flags, a)
			if !strings.Contains(a, "=") && !isBoolFlag(a) && i+1 < len(args) {
				i++
				flags = append(flags, args[i])
			}
		default:
			rest = append(rest, a)
		}
	}
	return append(append(args[:2:2], flags...), rest...)
}

func isBoolFlag(a string) bool {
	switch strings.TrimLeft(a, "-") {
	case "help", "h":
		return true
	}
	return false
}
