package overlay

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"net/netip"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// fixture is a node n1 (198.18.0.1/24 on eth0, podCIDR 10.42.1.0/24) in a
// fake kernel.
type fixture struct {
	k       *fakeKernel
	r       *reconciler
	changes int
}

func newFixture() *fixture {
	f := &fixture{k: newFakeKernel()}
	f.k.addUnderlay("lo", 65536, "127.0.0.1/8")
	f.k.addUnderlay("eth0", 1500, "198.18.0.1/24")
	f.r = &reconciler{k: f.k, log: quietLog(), changed: func(string, string) { f.changes++ }}
	return f
}

// desiredFor renders n1's desired state for the given peers.
func (f *fixture) desiredFor(t *testing.T, backend Backend, nodes ...*corev1.Node) desired {
	t.Helper()
	cfg := testConfig(t, backend)
	under, err := f.r.discoverUnderlay([]netip.Addr{netip.MustParseAddr("198.18.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	return render(&cfg, localNode{Name: "n1", PodCIDRs: v4Only, Underlay: under}, nodes).desired
}

var (
	peer2      = knitNode("n2", 2, []string{"10.42.2.0/24"}, []string{"198.18.0.2"})
	peer3      = knitNode("n3", 3, []string{"10.42.3.0/24"}, []string{"198.19.0.3"})
	peer3moved = knitNode("n3", 3, []string{"10.42.3.0/24"}, []string{"198.19.0.33"})
	ownMAC     = vtepMAC("n1", deviceV4).String()
	mac2, mac3 = testMAC(2, v4), testMAC(3, v4)
)

func TestReconcile(t *testing.T) {
	createAll := []string{
		"LinkAdd knit-vx4 mtu 1450 vxlan vni 1 port 8472 local 198.18.0.1 link 2 learning false address " + ownMAC,
		"LinkSet knit-vx4 up",
		"AddrAdd knit-vx4 10.42.1.0/32",
		"NeighSet fdb " + mac2 + " dev knit-vx4 dst 198.18.0.2",
		"NeighSet fdb " + mac3 + " dev knit-vx4 dst 198.19.0.3",
		"NeighSet 10.42.2.0 dev knit-vx4 lladdr " + mac2 + " permanent",
		"NeighSet 10.42.3.0 dev knit-vx4 lladdr " + mac3 + " permanent",
		"RouteReplace 10.42.2.0/24 via 10.42.2.0 dev knit-vx4 onlink proto 75",
		"RouteReplace 10.42.3.0/24 via 10.42.3.0 dev knit-vx4 onlink proto 75",
	}
	tests := []struct {
		name string
		// before is applied first (nil: start from an empty kernel), then
		// mutate changes the kernel behind the reconciler's back.
		before  []*corev1.Node
		mutate  func(t *testing.T, k *fakeKernel)
		backend Backend
		nodes   []*corev1.Node
		want    []string
	}{{
		name:  "empty kernel: everything created, entries before routes",
		nodes: []*corev1.Node{peer2, peer3},
		want:  createAll,
	}, {
		name:   "in sync: no netlink changes",
		before: []*corev1.Node{peer2, peer3},
		nodes:  []*corev1.Node{peer2, peer3},
		want:   nil,
	}, {
		name:   "route deleted by hand comes back",
		before: []*corev1.Node{peer2, peer3},
		mutate: func(t *testing.T, k *fakeKernel) {
			deleteRoute(t, k, "10.42.3.0/24")
		},
		nodes: []*corev1.Node{peer2, peer3},
		want:  []string{"RouteReplace 10.42.3.0/24 via 10.42.3.0 dev knit-vx4 onlink proto 75"},
	}, {
		name:   "FDB entry deleted by hand comes back",
		before: []*corev1.Node{peer2, peer3},
		mutate: func(t *testing.T, k *fakeKernel) {
			mustDo(t, k.NeighDel(&netlink.Neigh{LinkIndex: linkIndex(k, deviceV4), Family: unix.AF_BRIDGE,
				IP: net.ParseIP("198.18.0.2"), HardwareAddr: mustMAC(mac2)}))
		},
		nodes: []*corev1.Node{peer2, peer3},
		want:  []string{"NeighSet fdb " + mac2 + " dev knit-vx4 dst 198.18.0.2"},
	}, {
		name:   "neighbour overwritten with another MAC is fixed",
		before: []*corev1.Node{peer2, peer3},
		mutate: func(t *testing.T, k *fakeKernel) {
			mustDo(t, k.NeighSet(&netlink.Neigh{LinkIndex: linkIndex(k, deviceV4), Family: unix.AF_INET,
				State: netlink.NUD_PERMANENT, IP: net.ParseIP("10.42.2.0").To4(), HardwareAddr: mustMAC("02:ff:ff:ff:ff:ff")}))
		},
		nodes: []*corev1.Node{peer2, peer3},
		want:  []string{"NeighSet 10.42.2.0 dev knit-vx4 lladdr " + mac2 + " permanent"},
	}, {
		name:   "VXLAN device deleted by hand is recreated with everything on it",
		before: []*corev1.Node{peer2, peer3},
		mutate: func(t *testing.T, k *fakeKernel) {
			l, _ := k.LinkByName(deviceV4)
			mustDo(t, k.LinkDel(l))
		},
		nodes: []*corev1.Node{peer2, peer3},
		want:  createAll,
	}, {
		name:   "device down, wrong MTU, stray address: fixed in place, not recreated",
		before: []*corev1.Node{peer2, peer3},
		mutate: func(t *testing.T, k *fakeKernel) {
			l, _ := k.LinkByName(deviceV4)
			l.Attrs().Flags = 0
			l.Attrs().MTU = 1400
			k.links[l.Attrs().Index] = l
			mustDo(t, k.AddrAdd(l, &netlink.Addr{IPNet: toIPNet(netip.MustParsePrefix("10.42.9.0/32"))}))
		},
		nodes: []*corev1.Node{peer2, peer3},
		want: []string{
			"LinkSet knit-vx4 mtu 1450",
			"LinkSet knit-vx4 up",
			"AddrDel knit-vx4 10.42.9.0/32",
		},
	}, {
		name:   "device with another VNI is recreated",
		before: []*corev1.Node{peer2, peer3},
		mutate: func(t *testing.T, k *fakeKernel) {
			l, _ := k.LinkByName(deviceV4)
			l.(*netlink.Vxlan).VxlanId = 7
			k.links[l.Attrs().Index] = l
		},
		nodes: []*corev1.Node{peer2, peer3},
		want:  append([]string{"LinkDel knit-vx4"}, createAll...),
	}, {
		name:   "deleted peer: route, then neighbour and FDB entry removed",
		before: []*corev1.Node{peer2, peer3},
		nodes:  []*corev1.Node{peer2},
		want: []string{
			"RouteDel 10.42.3.0/24 via 10.42.3.0 dev knit-vx4 onlink proto 75",
			"NeighDel 10.42.3.0 dev knit-vx4",
			"NeighDel fdb " + mac3 + " dev knit-vx4 dst 198.19.0.3",
		},
	}, {
		name:   "peer's node IP changed: FDB entry replaced in place",
		before: []*corev1.Node{peer2, peer3},
		nodes:  []*corev1.Node{peer2, peer3moved},
		want: []string{
			"NeighSet fdb " + mac3 + " dev knit-vx4 dst 198.19.0.33",
			// The replace already moved it; the delete finds nothing (ignored).
			"NeighDel fdb " + mac3 + " dev knit-vx4 dst 198.19.0.3",
		},
	}, {
		name:   "entries knit does not own are left alone",
		before: []*corev1.Node{peer2},
		mutate: func(t *testing.T, k *fakeKernel) {
			mustDo(t, k.RouteReplace(&netlink.Route{Dst: toIPNet(netip.MustParsePrefix("10.42.5.0/24")),
				Gw: net.ParseIP("198.18.0.5"), LinkIndex: 2, Protocol: unix.RTPROT_BOOT, Family: unix.AF_INET}))
			mustDo(t, k.NeighSet(&netlink.Neigh{LinkIndex: 2, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
				IP: net.ParseIP("198.18.0.77").To4(), HardwareAddr: mustMAC("02:00:00:00:00:77")}))
			mustDo(t, k.NeighSet(&netlink.Neigh{LinkIndex: linkIndex(k, deviceV4), Family: unix.AF_INET,
				State: netlink.NUD_REACHABLE, IP: net.ParseIP("10.42.77.0").To4(), HardwareAddr: mustMAC("02:00:00:00:00:77")}))
		},
		nodes: []*corev1.Node{peer2},
		want:  nil,
	}, {
		name:    "backend changed to direct: device removed, direct route added",
		before:  []*corev1.Node{peer2, peer3},
		backend: BackendDirect,
		nodes:   []*corev1.Node{peer2, peer3},
		want: []string{
			"LinkDel knit-vx4",
			"RouteReplace 10.42.2.0/24 via 198.18.0.2 dev eth0 proto 75",
		},
	}, {
		name:    "vxlan to auto: same-subnet peer moves to a direct route atomically",
		before:  []*corev1.Node{peer2, peer3},
		backend: BackendAuto,
		nodes:   []*corev1.Node{peer2, peer3},
		want: []string{
			"RouteReplace 10.42.2.0/24 via 198.18.0.2 dev eth0 proto 75",
			"NeighDel 10.42.2.0 dev knit-vx4",
			"NeighDel fdb " + mac2 + " dev knit-vx4 dst 198.18.0.2",
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture()
			if tt.before != nil {
				d := f.desiredFor(t, BackendVXLAN, tt.before...)
				mustDo(t, f.r.apply(&d))
			}
			if tt.mutate != nil {
				tt.mutate(t, f.k)
			}
			f.k.takeCalls()
			backend := tt.backend
			if backend == "" {
				backend = BackendVXLAN
			}
			d := f.desiredFor(t, backend, tt.nodes...)
			mustDo(t, f.r.apply(&d))
			if got := f.k.takeCalls(); !slices.Equal(got, tt.want) {
				t.Errorf("calls:\n%s\nwant:\n%s", lines(got...), lines(tt.want...))
			}

			// Level-triggered: the result is what a fresh kernel converges to
			// (plus the foreign entries), and a second pass changes nothing.
			f.changes = 0
			mustDo(t, f.r.apply(&d))
			if got := f.k.takeCalls(); len(got) != 0 || f.changes != 0 {
				t.Errorf("second apply made changes:\n%s", lines(got...))
			}
			if tt.mutate == nil {
				fresh := newFixture()
				mustDo(t, fresh.r.apply(&d))
				if got, want := f.k.state(), fresh.k.state(); got != want {
					t.Errorf("state:\n%s\nfresh kernel:\n%s", got, want)
				}
			}
		})
	}
}

func TestReconcileFreshState(t *testing.T) {
	f := newFixture()
	d := f.desiredFor(t, BackendVXLAN, peer2, peer3)
	mustDo(t, f.r.apply(&d))
	want := lines(
		"addr eth0 198.18.0.1/24",
		"addr knit-vx4 10.42.1.0/32",
		"addr lo 127.0.0.1/8",
		"link eth0 mtu 1500 up",
		"link knit-vx4 mtu 1450 vxlan vni 1 port 8472 local 198.18.0.1 link 2 learning false address "+ownMAC+" up",
		"link lo mtu 65536 up",
		"neigh 10.42.2.0 dev knit-vx4 lladdr "+mac2+" permanent",
		"neigh 10.42.3.0 dev knit-vx4 lladdr "+mac3+" permanent",
		"neigh fdb "+mac2+" dev knit-vx4 dst 198.18.0.2",
		"neigh fdb "+mac3+" dev knit-vx4 dst 198.19.0.3",
		"route 10.42.2.0/24 via 10.42.2.0 dev knit-vx4 onlink proto 75",
		"route 10.42.3.0/24 via 10.42.3.0 dev knit-vx4 onlink proto 75",
	)
	if got := f.k.state(); got != want {
		t.Errorf("state:\n%s\nwant:\n%s", got, want)
	}
}

// A failing entry does not stop the others, and the failure is reported.
func TestReconcileCarriesOnPastFailures(t *testing.T) {
	f := newFixture()
	d := f.desiredFor(t, BackendVXLAN, peer2, peer3)
	d.Routes[0].LinkIndex, d.Routes[0].Dev = 99, "" // no such link
	err := f.r.apply(&d)
	if err == nil || !errors.Is(err, unix.ENODEV) {
		t.Fatalf("apply error = %v, want ENODEV", err)
	}
	if !slices.Contains(f.k.takeCalls(), "RouteReplace 10.42.3.0/24 via 10.42.3.0 dev knit-vx4 onlink proto 75") {
		t.Error("route to n3 not programmed after the route to n2 failed")
	}
}

// An interrupted dump is retried; one that keeps being interrupted fails
// the sync instead of acting on a partial table.
func TestRetryDump(t *testing.T) {
	calls := 0
	got, err := retryDump(func() ([]int, error) {
		calls++
		if calls < 3 {
			return []int{1}, netlink.ErrDumpInterrupted
		}
		return []int{1, 2}, nil
	})
	if err != nil || !slices.Equal(got, []int{1, 2}) || calls != 3 {
		t.Errorf("retryDump = %v, %v after %d calls", got, err, calls)
	}

	f := newFixture()
	d := f.desiredFor(t, BackendVXLAN, peer2)
	mustDo(t, f.r.apply(&d))
	f.k.interrupt = dumpAttempts
	k := &interruptingKernel{fakeKernel: f.k}
	f.r.k = k
	d = f.desiredFor(t, BackendVXLAN) // n2 gone: its route would be deleted
	if err := f.r.apply(&d); !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Errorf("apply with route dumps always interrupted: %v, want ErrDumpInterrupted", err)
	}
	if f.k.interrupt != 0 {
		t.Errorf("%d interrupts left, want all %d attempts used", f.k.interrupt, dumpAttempts)
	}
	if calls := f.k.takeCalls(); slices.ContainsFunc(calls, func(c string) bool { return len(c) > 8 && c[:8] == "RouteDel" }) {
		t.Errorf("deleted routes without a complete dump: %v", calls)
	}
}

// interruptingKernel wraps the fake's dumps in retryDump, as netlinkKernel does.
type interruptingKernel struct{ *fakeKernel }

func (k *interruptingKernel) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return retryDump(func() ([]netlink.Route, error) { return k.fakeKernel.RouteListFiltered(family, filter, mask) })
}

func TestDiscoverUnderlay(t *testing.T) {
	f := newFixture()
	got, err := f.r.discoverUnderlay([]netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("fd00::1")})
	if err == nil {
		t.Error("no error for a node IP on no interface")
	}
	want := underlay{Addr: netip.MustParseAddr("198.18.0.1"), Prefix: netip.MustParsePrefix("198.18.0.0/24"), LinkIndex: 2, MTU: 1500}
	if got[v4] != want || got[v6].Addr.IsValid() {
		t.Errorf("discoverUnderlay = %+v, want v4 %+v and no v6", got, want)
	}
}

func deleteRoute(t *testing.T, k *fakeKernel, dst string) {
	t.Helper()
	mustDo(t, k.RouteDel(&netlink.Route{Dst: toIPNet(netip.MustParsePrefix(dst)), Family: unix.AF_INET, Table: unix.RT_TABLE_MAIN}))
}

func linkIndex(k *fakeKernel, name string) int {
	l, err := k.LinkByName(name)
	if err != nil {
		return -1
	}
	return l.Attrs().Index
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
