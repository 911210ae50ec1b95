package sandbox

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Command is Enter without the wait: it returns the unshare command that
// runs args in a new sandbox, for callers that start it in the background
// (`knit lab up`) and set its stdio themselves. The caller must Start it.
func Command(args ...string) (*exec.Cmd, error) {
	if len(args) == 0 {
		return nil, errors.New("sandbox: Command needs a command")
	}
	if err := Available(); err != nil {
		return nil, err
	}
	hostNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("sandbox: reading own netns: %w", err)
	}
	argv := append(append(append([]string{}, unshareArgs...), "--"), args...)
	cmd := exec.Command("unshare", argv...)
	cmd.Env = append(freshEnv(), EnvSandbox+"=1", EnvHostNetNS+"="+hostNS)
	return cmd, nil
}

// JoinEnv is the environment a process started with nsenter(1) into a
// running sandbox needs so that InSandbox is true in it.
func JoinEnv() ([]string, error) {
	hostNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return nil, err
	}
	return []string{EnvSandbox + "=1", EnvHostNetNS + "=" + hostNS}, nil
}

// InnerPID returns the host PID of the sandbox's first process (PID 1 inside
// it), given the PID of the unshare process that made it: the target for
// nsenter(1).
func InnerPID(unsharePID int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", unsharePID, unsharePID))
	if err != nil {
		return 0, fmt.Errorf("sandbox: children of %d: %w", unsharePID, err)
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, fmt.Errorf("sandbox: unshare process %d has no child", unsharePID)
	}
	return strconv.Atoi(f[0])
}

// freshEnv is this process's environment without the marker that says a
// sandbox is already set up: a new sandbox must run its own Setup.
func freshEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envSetupDone+"=") {
			env = append(env, kv)
		}
	}
	return env
}
