package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"knit.dev/knit/cni/hostport"
	"knit.dev/knit/cni/ipam"
)

var stacks = []struct {
	name  string
	cidrs []string
}{
	{"v4", []string{"10.42.1.0/24"}},
	{"dual", []string{"10.42.1.0/24", "fd42:0:0:1::/64"}},
	{"v6", []string{"fd42:0:0:1::/64"}},
}

func TestAddCheckDel(t *testing.T) {
	for _, ver := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		for _, stack := range stacks {
			t.Run(ver+"/"+stack.name, func(t *testing.T) {
				n := newNode(t, stack.cidrs...)
				p := newPod(t, "add-check-del")
				out, code := n.call("ADD", n.conf(ver, nil), p.env())
				if code != 0 {
					t.Fatalf("ADD: %s", out)
				}
				r := parseResult(t, ver, out)
				hostName := HostVethName(p.id, "eth0")

				// The result.
				if len(r.Interfaces) != 3 || r.Interfaces[0].Name != n.cfg.Bridge || r.Interfaces[1].Name != hostName ||
					r.Interfaces[2].Name != "eth0" || r.Interfaces[2].Sandbox != p.ns.Path() {
					t.Fatalf("interfaces %v", r.Interfaces)
				}
				if len(r.IPs) != len(stack.cidrs) || len(r.Routes) != len(stack.cidrs) {
					t.Fatalf("ips %v routes %v", r.IPs, r.Routes)
				}
				for i, ipc := range r.IPs {
					want := strings.Replace(stack.cidrs[i], "0/", "2/", 1)
					if strings.Contains(want, "::/") {
						want = strings.Replace(stack.cidrs[i], "::/", "::2/", 1)
					}
					if ipc.Address.String() != want || ipc.Interface == nil || *ipc.Interface != 2 {
						t.Errorf("ips[%d] = %v, want %s on interface 2", i, ipc, want)
					}
				}

				// The host side: veth on the bridge, hairpin on, MTU from node.json.
				host, err := netlink.LinkByName(hostName)
				if err != nil {
					t.Fatal(err)
				}
				br, _ := netlink.LinkByName(n.cfg.Bridge)
				if host.Attrs().MasterIndex != br.Attrs().Index || host.Attrs().MTU != 1400 || host.Attrs().HardwareAddr.String() != r.Interfaces[1].Mac {
					t.Errorf("host veth %+v", host.Attrs())
				}
				if pi, err := netlink.LinkGetProtinfo(host); err != nil || !pi.Hairpin {
					t.Errorf("hairpin: %+v %v", pi, err)
				}

				// The pod side: up, addresses (IPv6 not tentative), default routes.
				p.in(t, func() error {
					l, err := netlink.LinkByName("eth0")
					if err != nil {
						return err
					}
					if l.Attrs().Flags&net.FlagUp == 0 || l.Attrs().MTU != 1400 || l.Attrs().HardwareAddr.String() != r.Interfaces[2].Mac {
						return fmt.Errorf("pod link %+v", l.Attrs())
					}
					addrs, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
					found := 0
					for _, a := range addrs {
						for _, ipc := range r.IPs {
							if a.IPNet.String() == ipc.Address.String() {
								found++
								if a.Flags&unix.IFA_F_TENTATIVE != 0 {
									return fmt.Errorf("%s is tentative (DAD not skipped)", a.IPNet)
								}
							}
						}
					}
					if found != len(r.IPs) {
						return fmt.Errorf("pod has %v, result says %v", addrs, r.IPs)
					}
					routes, _ := netlink.RouteList(l, netlink.FAMILY_ALL)
					defaults := 0
					for _, rt := range routes {
						if rt.Dst == nil || rt.Dst.IP.IsUnspecified() {
							defaults++
						}
					}
					if defaults != len(r.IPs) {
						return fmt.Errorf("%d default routes, want %d: %v", defaults, len(r.IPs), routes)
					}
					return nil
				})

				// CHECK (0.4.0 and later) with the ADD result as prevResult.
				withPrev := n.conf(ver, map[string]any{"prevResult": json.RawMessage(out)})
				if ver != "0.3.1" {
					if out, code := n.call("CHECK", withPrev, p.env()); code != 0 {
						t.Fatalf("CHECK: %s", out)
					}
				} else {
					n.mustCode("CHECK", withPrev, p.env(), types.ErrIncompatibleCNIVersion, "CHECK needs 0.4.0")
				}

				// DEL, twice. The namespace still exists: the host end is
				// cut off (down, off the bridge), not deleted.
				for i := range 2 {
					if out, code := n.call("DEL", withPrev, p.env()); code != 0 {
						t.Fatalf("DEL %d: %s", i, out)
					}
				}
				mustBeDetached(t, hostName)
				if st := n.store(); len(st.Reservations) != 0 {
					t.Errorf("reservations after DEL: %v", st.Reservations)
				}
				if ver != "0.3.1" {
					n.mustCode("CHECK", withPrev, p.env(), ErrCheckFailed, "no reservation")
				}
				// The runtime removes the namespace; the kernel takes the pair.
				p.remove()
				waitGone(t, hostName)
			})
		}
	}
}

func TestCheckReportsWhatIsWrong(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, n *node, p *pod)
		want   string
	}{
		{"route removed", func(t *testing.T, n *node, p *pod) {
			p.in(t, func() error {
				l, _ := netlink.LinkByName("eth0")
				routes, _ := netlink.RouteList(l, netlink.FAMILY_V4)
				for _, r := range routes {
					if r.Dst == nil || r.Dst.IP.IsUnspecified() {
						return netlink.RouteDel(&r)
					}
				}
				return errors.New("no default route")
			})
		}, "Route"},
		{"hairpin off", func(t *testing.T, n *node, p *pod) {
			l, _ := netlink.LinkByName(HostVethName(p.id, "eth0"))
			if err := netlink.LinkSetHairpin(l, false); err != nil {
				t.Fatal(err)
			}
		}, "hairpin mode is off"},
		{"pod down", func(t *testing.T, n *node, p *pod) {
			p.in(t, func() error {
				l, _ := netlink.LinkByName("eth0")
				return netlink.LinkSetDown(l)
			})
		}, "eth0: down"},
		{"reservation lost", func(t *testing.T, n *node, p *pod) {
			s, _ := ipam.Open(IPAMDir(n.stateDir), "knit", ipam.Options{Boot: n.boot()})
			if _, err := s.Retain(func(ipam.Reservation) bool { return false }); err != nil {
				t.Fatal(err)
			}
		}, "no reservation"},
		{"bridge gone", func(t *testing.T, n *node, p *pod) { deleteLink(n.cfg.Bridge) }, "bridge kbr"},
		{"host end detached", func(t *testing.T, n *node, p *pod) {
			if err := detachLink(HostVethName(p.id, "eth0")); err != nil {
				t.Fatal(err)
			}
		}, "DEL already ran"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t, "10.42.1.0/24")
			p := newPod(t, "check")
			out, code := n.call("ADD", n.conf("1.1.0", nil), p.env())
			if code != 0 {
				t.Fatal(out)
			}
			tc.break_(t, n, p)
			n.mustCode("CHECK", n.conf("1.1.0", map[string]any{"prevResult": json.RawMessage(out)}), p.env(), ErrCheckFailed, tc.want)
		})
	}
}

// TestPodConnectivity: right after ADD (no waiting for DAD) two pods reach
// each other and the node over IPv4 and IPv6.
func TestPodConnectivity(t *testing.T) {
	n := newNode(t, "10.42.1.0/24", "fd42:0:0:1::/64")
	a, b := newPod(t, "pod-a"), newPod(t, "pod-b")
	ra, rb := n.add(a, "1.1.0", nil), n.add(b, "1.1.0", nil)

	serve(t, b, "[::]:8080", "b")
	serve(t, nil, "[::]:8081", "node")
	for _, v6 := range []bool{false, true} {
		a.in(t, func() error {
			if got := dial(t, net.JoinHostPort(ipOf(rb, v6).String(), "8080")); got != "b" {
				return fmt.Errorf("pod a -> pod b (v6=%v): %q", v6, got)
			}
			gw := ipOf(ra, v6)
			gw[len(gw)-1] = 1
			if got := dial(t, net.JoinHostPort(gw.String(), "8081")); got != "node" {
				return fmt.Errorf("pod a -> node (v6=%v): %q", v6, got)
			}
			return nil
		})
	}
}

// serve answers every TCP connection on addr (in p's namespace, or the
// node's if p is nil) with msg.
func serve(t *testing.T, p *pod, addr, msg string) {
	t.Helper()
	var ln net.Listener
	listen := func() (err error) { ln, err = net.Listen("tcp", addr); return err }
	if p != nil {
		p.in(t, listen)
	} else if err := listen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, msg)
			c.Close()
		}
	}()
}

// dial connects to addr from the calling thread's namespace and returns
// what the server said.
func dial(t *testing.T, addr string) string {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	b, _ := io.ReadAll(c)
	return string(b)
}

// TestRollback injects a failure after each step of ADD and checks that
// nothing is left: no veth, no pod interface, no reservation, no hostPort.
func TestRollback(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed")
	}
	for _, stage := range []string{"allocated", "plumbed", "done"} {
		t.Run(stage, func(t *testing.T) {
			n := newNode(t, "10.42.1.0/24", "fd42:0:0:1::/64")
			p := newPod(t, "rollback")
			injected := errors.New("injected failure at " + stage)
			n.fault = func(s string) error {
				if s == stage {
					return injected
				}
				return nil
			}
			ports := map[string]any{"runtimeConfig": map[string]any{"portMappings": []map[string]any{{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}}}}
			n.mustCode("ADD", n.conf("1.1.0", ports), p.env(), types.ErrInternal, "injected failure at "+stage)
			if linkExists(HostVethName(p.id, "eth0")) {
				t.Error("host veth left behind")
			}
			p.in(t, func() error {
				links, _ := netlink.LinkList()
				if len(links) != 1 {
					return fmt.Errorf("pod netns has %d links after rollback", len(links))
				}
				return nil
			})
			if st := n.store(); len(st.Reservations) != 0 {
				t.Errorf("reservation left: %v", st.Reservations)
			}
			if out, err := exec.Command("nft", "list", "table", "inet", hostport.TableName).CombinedOutput(); err == nil {
				t.Errorf("hostport table left:\n%s", out)
			}
			// The pod can be added afterwards.
			n.fault = nil
			n.add(p, "1.1.0", ports)
			if out, code := n.call("DEL", n.conf("1.1.0", nil), p.env()); code != 0 {
				t.Fatal(out)
			}
		})
	}
}

func TestDelIsIdempotent(t *testing.T) {
	n := newNode(t, "10.42.1.0/24")
	conf := n.conf("1.1.0", nil)

	t.Run("unknown container", func(t *testing.T) {
		env := map[string]string{"CNI_CONTAINERID": "never-added", "CNI_IFNAME": "eth0"}
		if out, code := n.call("DEL", conf, env); code != 0 {
			t.Fatal(out)
		}
		env["CNI_NETNS"] = "/run/netns/does-not-exist"
		if out, code := n.call("DEL", conf, env); code != 0 {
			t.Fatal(out)
		}
	})

	t.Run("netns gone", func(t *testing.T) {
		p := newPod(t, "netns-gone")
		n.add(p, "1.1.0", nil)
		env := p.env()
		p.remove()
		if out, code := n.call("DEL", conf, env); code != 0 {
			t.Fatal(out)
		}
		if st := n.store(); len(st.Reservations) != 0 {
			t.Fatalf("reservation kept: %v", st.Reservations)
		}
		waitGone(t, HostVethName(p.id, "eth0"))
	})

	t.Run("half built", func(t *testing.T) {
		// Killed between allocation and plumbing, and between plumbing and
		// the result: DEL finishes the job either way.
		for _, stage := range []string{"allocated", "plumbed"} {
			p := newPod(t, "half-"+stage)
			killAt(t, n, p, stage)
			if out, code := n.call("DEL", conf, p.env()); code != 0 {
				t.Fatal(out)
			}
			if l, err := netlink.LinkByName(HostVethName(p.id, "eth0")); err == nil && !detached(l) {
				t.Fatalf("%s: DEL left the host veth attached", stage)
			}
			if len(n.store().Reservations) != 0 {
				t.Fatalf("%s: DEL left a reservation", stage)
			}
		}
	})
}

// mustBeDetached fails unless link exists, down and on no bridge.
func mustBeDetached(t *testing.T, link string) {
	t.Helper()
	l, err := netlink.LinkByName(link)
	if err != nil {
		t.Fatalf("%s: %v", link, err)
	}
	if !detached(l) {
		t.Fatalf("%s: flags %v, master %d: not detached", link, l.Attrs().Flags, l.Attrs().MasterIndex)
	}
}

// TestDelDetachesThenSweep: DEL with the namespace alive cuts the pod off
// at once (no traffic reaches it, the address can be reused); a host end
// whose namespace is never removed is deleted by GC's sweep, which spares
// reserved and attached veths and links that are not knit's.
func TestDelDetachesThenSweep(t *testing.T) {
	n := newNode(t, "10.42.1.0/24")
	conf := n.conf("1.1.0", nil)
	keep, gone := newPod(t, "sweep-keep"), newPod(t, "sweep-gone")
	n.add(keep, "1.1.0", nil)
	n.add(gone, "1.1.0", nil)
	if out, code := n.call("DEL", conf, gone.env()); code != 0 {
		t.Fatal(out)
	}
	goneHost := HostVethName(gone.id, "eth0")
	mustBeDetached(t, goneHost)
	// The kept pod's veth is down but reserved: not swept. A down veth
	// without knit's prefix is not knit's: not swept.
	keepHost := HostVethName(keep.id, "eth0")
	if err := detachLink(keepHost); err != nil {
		t.Fatal(err)
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "other0"
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "other1"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteLink("other0") })
	valid := []map[string]string{{"containerID": keep.id, "ifname": "eth0"}}
	if out, code := n.call("GC", n.conf("1.1.0", map[string]any{"cni.dev/valid-attachments": valid}), nil); code != 0 {
		t.Fatal(out)
	}
	if linkExists(goneHost) {
		t.Error("GC left the detached host veth of a released pod")
	}
	if !linkExists(keepHost) || !linkExists("other0") {
		t.Error("GC swept a reserved veth or one that is not knit's")
	}
	gone.in(t, func() error {
		if _, err := netlink.LinkByName("eth0"); err == nil {
			return errors.New("eth0 still in the pod after its host end was deleted")
		}
		return nil
	})
	// The runtime may ADD into the namespace again after a DEL.
	p := newPod(t, "sweep-again")
	n.add(p, "1.1.0", nil)
	if out, code := n.call("DEL", conf, p.env()); code != 0 {
		t.Fatal(out)
	}
	n.add(p, "1.1.0", nil)
	if l, err := netlink.LinkByName(HostVethName(p.id, "eth0")); err != nil || detached(l) {
		t.Fatalf("re-ADD after DEL: host veth %v, %v", l, err)
	}
}

func waitGone(t *testing.T, link string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); linkExists(link); {
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists", link)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// killAt runs ADD for p in a child process, waits until it reaches stage
// and kills it with SIGKILL there.
func killAt(t *testing.T, n *node, p *pod, stage string) {
	t.Helper()
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := execPlugin("ADD", n.conf("1.1.0", nil), p.env(), "KNIT_TEST_BLOCK_AT="+stage, "KNIT_TEST_READY="+ready)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatalf("plugin never reached %s", stage)
		}
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
}

func TestKill9MidAddThenGC(t *testing.T) {
	n := newNode(t, "10.42.1.0/24")
	keep := newPod(t, "keep")
	n.add(keep, "1.1.0", nil)
	victim := newPod(t, "victim")
	killAt(t, n, victim, "plumbed")

	st := n.store()
	if len(st.Reservations) != 2 || !linkExists(HostVethName(victim.id, "eth0")) {
		t.Fatalf("expected the killed ADD to leave its reservation and veth: %v", st.Reservations)
	}
	gc := n.conf("1.1.0", map[string]any{"cni.dev/valid-attachments": []map[string]string{{"containerID": keep.id, "ifname": "eth0"}}})
	if out, code := n.call("GC", gc, nil); code != 0 {
		t.Fatal(out)
	}
	st = n.store()
	if len(st.Reservations) != 1 || st.Reservations[0].ContainerID != keep.id {
		t.Fatalf("after GC: %v", st.Reservations)
	}
	if linkExists(HostVethName(victim.id, "eth0")) || !linkExists(HostVethName(keep.id, "eth0")) {
		t.Fatal("GC removed the wrong veth")
	}
	// The victim's sandbox is retried by the runtime: it works.
	n.add(victim, "1.1.0", nil)
}

func TestGC(t *testing.T) {
	n := newNode(t, "10.42.1.0/24")
	var pods []*pod
	for i := range 4 {
		p := newPod(t, fmt.Sprint("gc-", i))
		n.add(p, "1.1.0", nil)
		pods = append(pods, p)
	}
	valid := []map[string]string{{"containerID": pods[1].id, "ifname": "eth0"}, {"containerID": pods[3].id, "ifname": "eth0"}}
	if out, code := n.call("GC", n.conf("1.1.0", map[string]any{"cni.dev/valid-attachments": valid}), nil); code != 0 {
		t.Fatal(out)
	}
	var ids []string
	for _, r := range n.store().Reservations {
		ids = append(ids, r.ContainerID)
	}
	if fmt.Sprint(ids) != "[gc-1 gc-3]" {
		t.Fatalf("kept %v", ids)
	}
	for i, p := range pods {
		if linkExists(HostVethName(p.id, "eth0")) != (i%2 == 1) {
			t.Errorf("pod %d: veth presence wrong after GC", i)
		}
	}
	// GC with no valid attachment releases everything; GC needs 1.1.0.
	if out, code := n.call("GC", n.conf("1.1.0", nil), nil); code != 0 || len(n.store().Reservations) != 0 {
		t.Fatalf("GC all: %s", out)
	}
	n.mustCode("GC", n.conf("1.0.0", nil), nil, types.ErrIncompatibleCNIVersion, "GC needs 1.1.0")
}

func TestStatus(t *testing.T) {
	n := newNode(t, "10.42.1.0/30") // one address
	conf := n.conf("1.1.0", nil)
	if out, code := n.call("STATUS", conf, nil); code != 0 {
		t.Fatalf("ready node: %s", out)
	}
	p := newPod(t, "only")
	n.add(p, "1.1.0", nil)
	n.mustCode("STATUS", conf, nil, types.ErrPluginNotAvailable, "pool 10.42.1.0/30 exhausted")
	n.mustCode("ADD", conf, newPod(t, "one-too-many").env(), ErrPoolExhausted, "pool 10.42.1.0/30 exhausted")
	if out, code := n.call("DEL", conf, p.env()); code != 0 {
		t.Fatal(out)
	}
	if out, code := n.call("STATUS", conf, nil); code != 0 {
		t.Fatalf("after DEL: %s", out)
	}

	br, _ := netlink.LinkByName(n.cfg.Bridge)
	netlink.LinkSetDown(br)
	n.mustCode("STATUS", conf, nil, types.ErrLimitedConnectivity, "is down")
	netlink.LinkSetUp(br)

	os.Remove(NodeConfigPath(n.runDir))
	n.mustCode("STATUS", conf, nil, types.ErrPluginNotAvailable, "does not exist")
	n.mustCode("STATUS", n.conf("1.0.0", nil), nil, types.ErrIncompatibleCNIVersion, "STATUS needs 1.1.0")
}

// TestConcurrentAdds runs 16 plugin processes at once, as a runtime
// starting 16 pods would, and checks that every pod got its own addresses.
func TestConcurrentAdds(t *testing.T) {
	n := newNode(t, "10.42.1.0/24", "fd42:0:0:1::/64")
	const count = 16
	pods := make([]*pod, count)
	for i := range pods {
		pods[i] = newPod(t, fmt.Sprint("conc-", i))
	}
	results := make([]*current.Result, count)
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := execPlugin("ADD", n.conf("1.1.0", nil), p.env()).Output()
			if err != nil {
				t.Errorf("ADD %s: %v: %s", p.id, err, out)
				return
			}
			results[i] = parseResult(t, "1.1.0", string(out))
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	seen := map[string]string{}
	for i, r := range results {
		for _, ipc := range r.IPs {
			if other, dup := seen[ipc.Address.IP.String()]; dup {
				t.Errorf("%s given to %s and %s", ipc.Address.IP, other, pods[i].id)
			}
			seen[ipc.Address.IP.String()] = pods[i].id
		}
	}
	if len(seen) != 2*count || len(n.store().Reservations) != count {
		t.Fatalf("%d addresses, %d reservations", len(seen), len(n.store().Reservations))
	}
	for _, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := execPlugin("DEL", n.conf("1.1.0", nil), p.env()).Output(); err != nil {
				t.Errorf("DEL %s: %v: %s", p.id, err, out)
			}
		}()
	}
	wg.Wait()
	if len(n.store().Reservations) != 0 {
		t.Fatal("reservations left after concurrent DELs")
	}
}

// TestRebootSimulation: /run is wiped (node.json, pod namespaces) and the
// bridge is gone, the state dir survives. The plugin refuses ADD until the
// agent has prepared the node again, then works without handing out an
// address the old reservations hold; GC (or a new boot ID) frees those.
func TestRebootSimulation(t *testing.T) {
	n := newNode(t, "10.42.1.0/24")
	var before []*pod
	for i := range 3 {
		p := newPod(t, fmt.Sprint("before-", i))
		n.add(p, "1.1.0", nil)
		before = append(before, p)
	}
	conf := n.conf("1.1.0", nil)
	// "Reboot".
	for _, p := range before {
		p.remove()
	}
	deleteLink(n.cfg.Bridge)
	os.RemoveAll(n.runDir)

	fresh := newPod(t, "after-0")
	n.mustCode("STATUS", conf, nil, types.ErrPluginNotAvailable, "does not exist")
	n.mustCode("ADD", conf, fresh.env(), types.ErrTryAgainLater, "node.json does not exist")
	// DEL of the pre-reboot sandboxes works without node.json.
	if out, code := n.call("DEL", conf, before[0].env()); code != 0 {
		t.Fatal(out)
	}

	// The agent is back.
	if _, err := EnsureBridge(n.cfg.Bridge, n.cfg.MTU, n.cfg.PodCIDRs, nil); err != nil {
		t.Fatal(err)
	}
	n.writeNodeConfig()
	r := n.add(fresh, "1.1.0", nil)
	old := map[string]bool{}
	for _, res := range n.store().Reservations {
		if strings.HasPrefix(res.ContainerID, "before-") {
			old[res.IPs[0].String()] = true
		}
	}
	if len(old) != 2 || old[r.IPs[0].Address.IP.String()] {
		t.Fatalf("new pod got %s, old reservations %v", r.IPs[0].Address.IP, old)
	}
	gc := n.conf("1.1.0", map[string]any{"cni.dev/valid-attachments": []map[string]string{{"containerID": fresh.id, "ifname": "eth0"}}})
	if out, code := n.call("GC", gc, nil); code != 0 || len(n.store().Reservations) != 1 {
		t.Fatalf("GC after reboot: %s, %v", out, n.store().Reservations)
	}

	// A real reboot changes the boot ID: the next ADD drops everything the
	// previous boot reserved, even without GC.
	fresh.remove()
	n.setBoot("boot-2")
	next := newPod(t, "after-boot-2")
	n.add(next, "1.1.0", nil)
	st := n.store()
	if len(st.Reservations) != 1 || st.Reservations[0].ContainerID != next.id {
		t.Fatalf("after boot ID change: %+v", st)
	}
}

// TestHostPort maps node ports to pods through the knit-hostport table and
// sends real connections through it: from the node, and from the pod to
// itself (hairpin).
func TestHostPort(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not installed")
	}
	n := newNode(t, "10.42.1.0/24", "fd42:0:0:1::/64")
	web := newPod(t, "web")
	ports := func(pm ...map[string]any) map[string]any {
		return map[string]any{"runtimeConfig": map[string]any{"portMappings": pm}}
	}
	n.add(web, "1.1.0", ports(
		map[string]any{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"},
		map[string]any{"hostPort": 18081, "containerPort": 80, "protocol": "tcp", "hostIP": "10.42.1.1"},
	))
	serve(t, web, "[::]:80", "web")

	for _, target := range []string{"10.42.1.1:18080", "[fd42:0:0:1::1]:18080", "10.42.1.1:18081"} {
		if got := dial(t, target); got != "web" {
			t.Errorf("node -> %s: %q", target, got)
		}
		web.in(t, func() error {
			if got := dial(t, target); got != "web" {
				return fmt.Errorf("pod -> own hostPort %s (hairpin): %q", target, got)
			}
			return nil
		})
	}

	// A second pod cannot take the same hostPort.
	other := newPod(t, "other")
	n.mustCode("ADD", n.conf("1.1.0", ports(map[string]any{"hostPort": 18080, "containerPort": 81, "protocol": "tcp"})), other.env(),
		ErrHostPortConflict, "hostPort 18080/tcp is already mapped")
	if len(n.store().Reservations) != 1 {
		t.Fatal("the refused ADD kept a reservation")
	}

	prev, code := n.call("ADD", n.conf("1.1.0", ports(map[string]any{"hostPort": 18090, "containerPort": 80, "protocol": "udp"})), other.env())
	if code != 0 {
		t.Fatal(prev)
	}
	if out, code := n.call("CHECK", n.conf("1.1.0", map[string]any{"prevResult": json.RawMessage(prev)}), other.env()); code != 0 {
		t.Fatalf("CHECK with hostPorts: %s", out)
	}
	nft, err := hostport.New()
	if err != nil {
		t.Fatal(err)
	}
	elems, err := nft.ListElements(context.Background(), "map", "hostport-v4")
	if err != nil || len(elems) != 2 {
		t.Fatalf("hostport-v4 elements %v, %v", elems, err)
	}

	for _, p := range []*pod{web, other} {
		if out, code := n.call("DEL", n.conf("1.1.0", nil), p.env()); code != 0 {
			t.Fatal(out)
		}
	}
	if out, err := exec.Command("nft", "list", "table", "inet", hostport.TableName).CombinedOutput(); err == nil {
		t.Fatalf("table left after the last hostPort pod went:\n%s", out)
	}
}

// TestAddErrorsNameTheProblem covers the failures that need a node.
func TestAddErrorsNameTheProblem(t *testing.T) {
	n := newNode(t, "10.42.1.0/24")
	p := newPod(t, "errs")
	env := p.env()
	bad := func(k, v string) map[string]string {
		e := map[string]string{}
		for a, b := range env {
			e[a] = b
		}
		if v == "" {
			delete(e, k)
		} else {
			e[k] = v
		}
		return e
	}
	conf := n.conf("1.0.0", nil)
	n.mustCode("ADD", conf, bad("CNI_NETNS", ""), types.ErrInvalidEnvironmentVariables, "CNI_NETNS")
	n.mustCode("ADD", conf, bad("CNI_NETNS", "/run/netns/nope"), types.ErrInvalidNetNS, "CNI_NETNS")
	n.mustCode("ADD", conf, bad("CNI_NETNS", "/proc/self/ns/net"), types.ErrInvalidNetNS, "plugin's own network namespace")
	n.mustCode("ADD", conf, bad("CNI_IFNAME", "this-name-is-too-long"), types.ErrInvalidEnvironmentVariables, "CNI_IFNAME")
	n.mustCode("ADD", conf, bad("CNI_ARGS", "K8S_POD_NAME"), types.ErrInvalidEnvironmentVariables, "CNI_ARGS")
	if len(n.store().Reservations) != 0 {
		t.Fatal("a failed ADD kept a reservation")
	}
	// eth0 already exists in the pod: ADD fails and leaves the pod alone.
	n.add(p, "1.0.0", nil)
	other := map[string]string{}
	for a, b := range env {
		other[a] = b
	}
	other["CNI_CONTAINERID"] = "another-sandbox"
	n.mustCode("ADD", conf, other, types.ErrInternal, "interface eth0 already exists")
	p.in(t, func() error {
		_, err := netlink.LinkByName("eth0")
		return err
	})
	if len(n.store().Reservations) != 1 {
		t.Fatal("the failed ADD kept a reservation")
	}
}
