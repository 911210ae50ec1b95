package command

import (
	"io"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"knit.dev/knit/agent"
	"knit.dev/knit/proxy/lb"
)

// parseAgent runs the agent command's flag parsing only.
func parseAgent(t *testing.T, args ...string) (agent.Config, error) {
	t.Helper()
	cmd := agentCommand()
	var cfg agent.Config
	var err error
	cmd.Action = func(c *cli.Context) error {
		cfg, err = agentConfig(c)
		return nil
	}
	app := &cli.App{Name: "knit", Commands: []*cli.Command{cmd}, Writer: io.Discard, ErrWriter: io.Discard}
	if rerr := app.Run(append([]string{"knit", "agent"}, args...)); rerr != nil {
		t.Fatalf("flags %q: %v", args, rerr)
	}
	return cfg, err
}

// TestLoadBalancerFlags: the load balancer runs with the proxy unless
// --lb-class is empty, and takes its settings from the --lb-* flags.
func TestLoadBalancerFlags(t *testing.T) {
	for _, tt := range []struct {
		name         string
		args         []string
		enabled      bool
		class        string
		defaultClass bool
		maxNodes     int
		reserved     string
	}{
		{"defaults", nil, true, lb.DefaultClass, false, lb.DefaultMaxNodes, lb.FormatPortRanges(lb.DefaultReservedPorts())},
		{"with the proxy only", []string{"--components=proxy"}, true, lb.DefaultClass, false, lb.DefaultMaxNodes, ""},
		{"without the proxy", []string{"--components=dns"}, false, lb.DefaultClass, false, lb.DefaultMaxNodes, ""},
		{"turned off", []string{"--lb-class="}, false, "", false, lb.DefaultMaxNodes, ""},
		{"settings", []string{"--lb-class=example.com/edge", "--lb-default-class", "--lb-max-nodes=0", "--lb-reserved-ports=22/tcp, 1000-1999/udp"},
			true, "example.com/edge", true, 0, "22/tcp,1000-1999/udp"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parseAgent(t, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			got := cfg.Component.LB
			if tt.reserved != "" && lb.FormatPortRanges(got.ReservedPorts) != tt.reserved {
				t.Errorf("reserved ports %s, want %s", lb.FormatPortRanges(got.ReservedPorts), tt.reserved)
			}
			if cfg.Enabled["lb"] != tt.enabled || got.Class != tt.class || got.DefaultClass != tt.defaultClass || got.MaxNodes != tt.maxNodes {
				t.Errorf("lb enabled %v, config %+v; want enabled %v, class %q, default class %v, max nodes %d",
					cfg.Enabled["lb"], got, tt.enabled, tt.class, tt.defaultClass, tt.maxNodes)
			}
		})
	}
}

func TestLoadBalancerFlagErrors(t *testing.T) {
	for _, arg := range []string{"--lb-reserved-ports=22", "--lb-reserved-ports=22/icmp", "--lb-reserved-ports=9-1/tcp", "--lb-reserved-ports=0/tcp"} {
		if _, err := parseAgent(t, arg); err == nil || !strings.Contains(err.Error(), "--lb-reserved-ports") {
			t.Errorf("%s: %v, want an error naming the flag", arg, err)
		}
	}
}
