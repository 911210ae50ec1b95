package sandbox

import (
	"net"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

func TestGuardOutside(t *testing.T) {
	t.Setenv(EnvSandbox, "1")
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Skip(err)
	}
	// KNIT_SANDBOX=1 alone must not unlock networking in the netns it
	// was set in.
	t.Setenv(EnvHostNetNS, self)
	if InSandbox() || Check() == nil {
		t.Fatal("InSandbox true in the netns recorded as the host's")
	}
	t.Setenv(EnvHostNetNS, "")
	if InSandbox() {
		t.Fatal("InSandbox true without a recorded host netns")
	}
}

func TestSetup(t *testing.T) {
	Require(t)
	entries, err := os.ReadDir("/sys/class/net")
	if err != nil {
		t.Fatal(err)
	}
	var links []string
	for _, e := range entries {
		links = append(links, e.Name())
	}
	slices.Sort(links)
	if !slices.Equal(links, []string{UnderlayBridge, "lo"}) {
		t.Errorf("/sys/class/net = %v, want the sandbox's own [%s lo]", links, UnderlayBridge)
	}
	ifc, err := net.InterfaceByName(UnderlayBridge)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(addrs, func(a net.Addr) bool { return a.String() == UnderlayCIDR }) {
		t.Errorf("%s addresses = %v, want %s", UnderlayBridge, addrs, UnderlayCIDR)
	}
	// The control plane address is local: something can listen on it.
	l, err := net.Listen("tcp", net.JoinHostPort(ControlPlaneIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	shared := false
	for line := range strings.Lines(string(mounts)) {
		if strings.Contains(line, " /run/netns ") && strings.Contains(line, "shared:") {
			shared = true
		}
	}
	if !shared {
		t.Errorf("/run/netns is not a shared mount:\n%s", mounts)
	}
}
