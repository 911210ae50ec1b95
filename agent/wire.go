package agent

// ComponentConfig holds the per-component settings the command line parses.
type ComponentConfig struct{}

// builder constructs one component from the agent's shared pieces.
type builder struct {
	name  string
	build func(a *Agent) (Component, error)
}

// builders lists every component the agent can run, in start order.
var builders = []builder{}
