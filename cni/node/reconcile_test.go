package node

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/cni/hostport"
	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
)

// fakePods is a podLister over a fixed set of pods.
type fakePods []*corev1.Pod

func (f fakePods) podsOn(node string) ([]*corev1.Pod, error) {
	var out []*corev1.Pod
	for _, p := range f {
		if p.Spec.NodeName == node {
			out = append(out, p)
		}
	}
	return out, nil
}

func pod(ns, name, uid, node string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: k8stypes.UID(uid)}, Spec: corev1.PodSpec{NodeName: node}}
}

func TestStale(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	old := now.Add(-10 * time.Minute)
	sn := &staleness{
		present:     map[podKey]bool{{"default", "web"}: true},
		now:         now,
		grace:       2 * time.Minute,
		netnsExists: func(p string) bool { return p == "/run/netns/alive" },
	}
	res := func(ns, name, uid string, created time.Time, netns string) ipam.Reservation {
		return ipam.Reservation{Attachment: ipam.Attachment{ContainerID: "c", IfName: "eth0"},
			Pod: ipam.PodRef{Namespace: ns, Name: name, UID: uid}, Created: created, Netns: netns}
	}
	for _, tc := range []struct {
		name string
		r    ipam.Reservation
		want bool
	}{
		{"pod gone, old, netns gone", res("default", "gone", "u1", old, "/run/netns/dead"), true},
		{"pod gone, no netns recorded", res("default", "gone", "u1", old, ""), true},
		{"pod present", res("default", "web", "u1", old, "/run/netns/dead"), false},
		{"pod present under another UID (static pod's mirror)", res("default", "web", "other-uid", old, ""), false},
		{"same name in another namespace", res("other", "web", "u1", old, "/run/netns/dead"), true},
		{"no pod identity: left to CNI GC", res("", "", "", old, "/run/netns/dead"), false},
		{"only a name", res("", "web2", "", old, ""), false},
		{"younger than the grace period", res("default", "gone", "u1", now.Add(-time.Minute), ""), false},
		{"exactly the grace period old", res("default", "gone", "u1", now.Add(-2*time.Minute), ""), true},
		{"no creation time", res("default", "gone", "u1", time.Time{}, ""), false},
		{"created in the future (clock stepped back)", res("default", "gone", "u1", now.Add(time.Hour), ""), false},
		{"netns still there: the runtime will DEL it", res("default", "gone", "u1", old, "/run/netns/alive"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := sn.stale(tc.r); got != tc.want {
				t.Fatalf("stale = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestReconcile runs the reconciliation on a real store with a fake pod
// lister and a fake nftables: the reservations of gone pods are released
// with their hostPorts and host veths, the others stay.
func TestReconcile(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	h.sync()
	now := time.Now()
	h.s.now = func() time.Time { return now }
	h.s.netnsExists = func(p string) bool { return p == "/run/netns/still-there" }
	h.s.pods = fakePods{
		pod("default", "web", "u-web", "n1"),
		pod("default", "moved", "u-moved-new", "n2"), // recreated on another node
	}
	nft := knftables.NewFake(knftables.InetFamily, hostport.TableName)
	h.s.newNFT = func() (knftables.Interface, error) { return nft, nil }

	store, err := h.s.openStore()
	if err != nil {
		t.Fatal(err)
	}
	pool := []netip.Prefix{pfx("10.42.1.0/24")}
	type spec struct {
		id, ns, name string
		age          time.Duration
		netns        string
		hostPort     uint16
	}
	specs := []spec{
		{id: "live", ns: "default", name: "web", age: time.Hour, netns: "/run/netns/a", hostPort: 8080},
		{id: "gone", ns: "default", name: "deleted", age: time.Hour, netns: "/run/netns/b", hostPort: 9090},
		{id: "moved", ns: "default", name: "moved", age: time.Hour, netns: "/run/netns/c"},
		{id: "young", ns: "default", name: "starting", age: 30 * time.Second, netns: "/run/netns/d"},
		{id: "anon", age: time.Hour, netns: "/run/netns/e"},
		{id: "netns", ns: "default", name: "terminating", age: time.Hour, netns: "/run/netns/still-there"},
	}
	if err := store.Update(func(st *ipam.State) error {
		for _, s := range specs {
			req := ipam.Request{Attachment: ipam.Attachment{ContainerID: s.id, IfName: "eth0"}, Netns: s.netns,
				Pod: ipam.PodRef{Namespace: s.ns, Name: s.name, UID: "u-" + s.id}, Now: now.Add(-s.age)}
			if s.hostPort != 0 {
				req.PortMappings = []ipam.PortMapping{{HostPort: s.hostPort, ContainerPort: 80, Protocol: "tcp"}}
			}
			if _, err := st.Allocate(req, pool); err != nil {
				return err
			}
		}
		ms, _ := hostport.FromReservations(st.Reservations)
		return hostport.Sync(context.Background(), nft, ms)
	}); err != nil {
		t.Fatal(err)
	}

	if err := h.s.reconcile(); err != nil {
		t.Fatal(err)
	}
	st, err := store.View()
	if err != nil {
		t.Fatal(err)
	}
	var kept []string
	for _, r := range st.Reservations {
		kept = append(kept, r.ContainerID)
	}
	if got := strings.Join(kept, ","); got != "live,young,anon,netns" {
		t.Fatalf("kept %s, want live,young,anon,netns", got)
	}
	wantDeleted := fmt.Sprint([]string{plugin.HostVethName("gone", "eth0"), plugin.HostVethName("moved", "eth0")})
	if got := fmt.Sprint(h.k.deleted); got != wantDeleted {
		t.Fatalf("deleted links %s, want %s", got, wantDeleted)
	}
	dump := nft.Dump()
	if !strings.Contains(dump, "8080") || strings.Contains(dump, "9090") {
		t.Fatalf("hostport table after reconcile:\n%s", dump)
	}
	if got := testutil.ToFloat64(h.s.m.released); got != 2 {
		t.Fatalf("released metric %v, want 2", got)
	}

	// Nothing stale left: no write at all.
	before, _ := storeModTime(store)
	if err := h.s.reconcile(); err != nil {
		t.Fatal(err)
	}
	if after, _ := storeModTime(store); !after.Equal(before) {
		t.Fatal("a reconciliation with nothing to release wrote the store")
	}
}

// TestReconcileKeepsPortsWhenNFTFails: if the hostPort table cannot be
// updated, a reservation with hostPorts is kept (its DNAT still points at
// the address), one without is released.
func TestReconcileKeepsPortsWhenNFTFails(t *testing.T) {
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	h.sync()
	h.s.pods = fakePods{}
	h.s.netnsExists = func(string) bool { return false }
	h.s.newNFT = func() (knftables.Interface, error) { return nil, fmt.Errorf("no nft here") }
	store, _ := h.s.openStore()
	store.Update(func(st *ipam.State) error {
		for i, ports := range [][]ipam.PortMapping{nil, {{HostPort: 8080, ContainerPort: 80, Protocol: "tcp"}}} {
			if _, err := st.Allocate(ipam.Request{Attachment: ipam.Attachment{ContainerID: fmt.Sprint("c", i), IfName: "eth0"},
				Pod: ipam.PodRef{Namespace: "default", Name: fmt.Sprint("p", i)}, PortMappings: ports, Now: time.Now().Add(-time.Hour)},
				[]netip.Prefix{pfx("10.42.1.0/24")}); err != nil {
				return err
			}
		}
		return nil
	})
	if err := h.s.reconcile(); err == nil || !strings.Contains(err.Error(), "no nft here") {
		t.Fatalf("reconcile: %v", err)
	}
	st, _ := store.View()
	if len(st.Reservations) != 1 || st.Reservations[0].ContainerID != "c1" {
		t.Fatalf("kept %+v, want only c1 (with hostPorts)", st.Reservations)
	}
}

func storeModTime(s *ipam.Store) (time.Time, error) {
	fi, err := os.Stat(s.Path())
	if err != nil {
		return time.Time{}, err
	}
	return fi.ModTime(), nil
}

// TestPodIndex: the reconciliation's view of the Pod informer, through the
// index New adds, holds this node's pods only.
func TestPodIndex(t *testing.T) {
	h := newHarness(t, Config{}, testNode("n1"),
		pod("default", "a", "u-a", "n1"), pod("default", "b", "u-b", "n2"), pod("kube-system", "c", "u-c", "n1"),
		pod("default", "pending", "u-p", ""))
	waitFor(t, "pods in the index", func() bool {
		ps, err := h.s.pods.podsOn("n1")
		return err == nil && len(ps) == 2
	})
	ps, _ := h.s.pods.podsOn("n1")
	var names []string
	for _, p := range ps {
		names = append(names, p.Namespace+"/"+p.Name)
	}
	if got := strings.Join(names, ","); got != "default/a,kube-system/c" && got != "kube-system/c,default/a" {
		t.Fatalf("pods on n1: %s", got)
	}
}

// TestReconcileSweepsDetachedHostVeths: a host veth DEL cut off (down, on
// no bridge) whose pod namespace was never removed is deleted even when no
// reservation is stale; reserved, up or foreign veths stay.
func TestReconcileSweepsDetachedHostVeths(t *testing.T) {
	netns := nodeNS(t)
	mtu, _ := fixedMTU(1450)
	h := newHarness(t, Config{MTU: mtu}, testNode("n1", "10.42.1.0/24"))
	h.s.k = netlinkKernel{do: func(f func() error) error { return netns.Do(func(ns.NetNS) error { return f() }) }}
	h.s.pods = fakePods{}
	h.sync()

	leftover := plugin.HostVethName("detached", "eth0")
	reserved := plugin.HostVethName("reserved", "eth0")
	up := plugin.HostVethName("up", "eth0")
	inNS(t, netns, func() error {
		for i, name := range []string{leftover, reserved, up} {
			attrs := netlink.NewLinkAttrs()
			attrs.Name = name
			if name == up {
				attrs.Flags = net.FlagUp
			}
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: fmt.Sprint("peer", i)}); err != nil {
				return err
			}
		}
		return nil
	})
	store, err := h.s.openStore()
	if err != nil {
		t.Fatal(err)
	}
	// No pod identity: never stale, only its veth name matters.
	if err := store.Update(func(st *ipam.State) error {
		_, err := st.Allocate(ipam.Request{Attachment: ipam.Attachment{ContainerID: "reserved", IfName: "eth0"}, Now: time.Now()},
			[]netip.Prefix{netip.MustParsePrefix("10.42.1.0/24")})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := h.s.reconcile(); err != nil {
		t.Fatal(err)
	}
	inNS(t, netns, func() error {
		for name, want := range map[string]bool{leftover: false, reserved: true, up: true, "uplink": true} {
			if _, err := netlink.LinkByName(name); (err == nil) != want {
				return fmt.Errorf("%s: exists %v, want %v", name, err == nil, want)
			}
		}
		return nil
	})
	if st, _ := store.View(); len(st.Reservations) != 1 {
		t.Fatalf("reservations: %+v", st.Reservations)
	}
}
