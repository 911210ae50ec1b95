package proxy

import (
	"bufio"
	"errors"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
)

// TestKernelDataPath sends real connections through the rules in the
// sandbox: a client and a server "pod" in network namespaces of their own,
// connected by veths to the sandbox's namespace, which plays the node.
//
//	client 10.42.1.2 ──veth── node (10.42.1.1 | 10.42.2.1) ──veth── server 10.42.2.2:8080
func TestKernelDataPath(t *testing.T) {
	requireSandbox(t)
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatalf("ip_forward (sandbox netns): %v", err)
	}
	client := podNS(t, "vc", "10.42.1.1/24", "10.42.1.2/24")
	server := podNS(t, "vs", "10.42.2.1/24", "10.42.2.2/24")

	// A node has a default route; without one, traffic to a ClusterIP
	// that is not DNATed never reaches the forward hook.
	def := &netlink.Route{Gw: net.ParseIP("10.42.2.2")}
	must(t, netlink.RouteReplace(def))
	t.Cleanup(func() { _ = netlink.RouteDel(def) })

	// The server answers with the address it sees the client as.
	serveClientAddr(t, server, "10.42.2.2:8080", "")

	nft, lister, err := newNFT()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", tableName).Run() })
	h := newHarness(t, testConfig(), nft,
		service("ns1", "web", "10.43.0.20", withNodePort(30080)),
		slice("ns1", "web", "web-1", 8080, []ep{{ip: "10.42.2.2", node: otherNode}}),
		service("ns1", "empty", "10.43.0.21"),
	)
	h.p.backend.lister = lister
	h.sync()

	dial := func(addr string) (string, error) {
		c := inNS(t, client, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 3*time.Second) })
		if c == nil {
			return "", errors.New("no conn")
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		return strings.TrimSpace(line), err
	}
	// ClusterIP from a pod: DNATed, client address kept.
	if got, err := dial("10.43.0.20:80"); err != nil || got != "10.42.1.2" {
		t.Errorf("ClusterIP: got %q, %v; want the server to see 10.42.1.2", got, err)
	}
	// NodePort on the node's address: DNATed and masqueraded (policy
	// Cluster), so the server sees the node.
	if got, err := dial("10.42.1.1:30080"); err != nil || got != "10.42.2.1" {
		t.Errorf("NodePort: got %q, %v; want the server to see the node, 10.42.2.1", got, err)
	}
	// No endpoints: refused at once, not a timeout.
	start := time.Now()
	_, err = inNSErr(client, func() (net.Conn, error) { return net.DialTimeout("tcp", "10.43.0.21:80", 3*time.Second) })
	if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
		t.Errorf("Service without endpoints: %v after %v; want connection refused at once", err, time.Since(start))
	}
	// Endpoints appear: the same Service now answers.
	h.addSlice(slice("ns1", "empty", "empty-1", 8080, []ep{{ip: "10.42.2.2", node: otherNode}}))
	h.sync()
	if got, err := dial("10.43.0.21:80"); err != nil || got != "10.42.1.2" {
		t.Errorf("after endpoints appeared: got %q, %v", got, err)
	}

	// UDP: a client keeps its socket (one conntrack entry); when its
	// endpoint goes away, the stale entry is deleted (real netlink) and
	// the next datagram reaches the remaining endpoint.
	nh, err := netlink.NewHandleAt(server)
	must(t, err)
	defer nh.Close()
	in, err := nh.LinkByName("vsp")
	must(t, err)
	a3, _ := netlink.ParseAddr("10.42.2.3/24")
	must(t, nh.AddrAdd(in, a3))
	for _, ip := range []string{"10.42.2.2", "10.42.2.3"} {
		serveUDPName(t, server, ip)
	}
	h.p.ct = netlinkConntrack{}
	udpSvc := service("ns1", "dns", "10.43.0.30", withPorts(corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}))
	h.addService(udpSvc)
	h.addSlice(udpSlice("dns", "10.42.2.2", "10.42.2.3"))
	h.sync()
	uc := inNS(t, client, func() (net.Conn, error) { return net.Dial("udp", "10.43.0.30:53") })
	defer uc.Close()
	first := askUDP(uc)
	if first == "" {
		t.Fatal("UDP Service does not answer")
	}
	if again := askUDP(uc); again != first {
		t.Fatalf("one UDP flow changed endpoint without a change: %s then %s", first, again)
	}
	other := map[string]string{"10.42.2.2": "10.42.2.3", "10.42.2.3": "10.42.2.2"}[first]
	h.updateSlice(udpSlice("dns", other))
	h.sync()
	if got := askUDP(uc); got != other {
		t.Errorf("after %s left the Service, the flow still goes to %q; want %s (stale conntrack entry not deleted)", first, got, other)
	}
}

// serveClientAddr listens on TCP addr in ns and answers every connection
// with prefix and the address it sees the client as, until the test ends.
func serveClientAddr(t *testing.T, ns netns.NsHandle, addr, prefix string) {
	t.Helper()
	ln := inNS(t, ns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
	if ln == nil {
		return
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(prefix + c.RemoteAddr().(*net.TCPAddr).IP.String() + "\n"))
			c.Close()
		}
	}()
}

// serveUDPName listens on ip:5353 in ns and answers every datagram with
// ip, until the test ends.
func serveUDPName(t *testing.T, ns netns.NsHandle, ip string) {
	t.Helper()
	pc := inNS(t, ns, func() (net.PacketConn, error) { return net.ListenPacket("udp", ip+":5353") })
	if pc == nil {
		return
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 64)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(ip), from)
		}
	}()
}

// askUDP sends "q" on uc until an answer comes (5 tries, 300 ms each) and
// returns the answer, "" if none came.
func askUDP(uc net.Conn) string {
	buf := make([]byte, 64)
	for range 5 {
		_, _ = uc.Write([]byte("q"))
		_ = uc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, err := uc.Read(buf); err == nil {
			return string(buf[:n])
		}
	}
	return ""
}

// podNS makes a network namespace joined to this one by a veth: hostIP on
// this side (name), podIP inside, with a default route to hostIP.
func podNS(t *testing.T, name, hostCIDR, podCIDR string) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	root, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	ns, err := netns.New() // also switches this thread into it
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
	must(t, netlink.LinkAdd(veth))
	t.Cleanup(func() { _ = netlink.LinkDel(veth) }) // the sandbox's own netns, for the next test
	peer, err := netlink.LinkByName(name + "p")
	must(t, err)
	must(t, netlink.LinkSetNsFd(peer, int(ns)))
	host, err := netlink.LinkByName(name)
	must(t, err)
	a, _ := netlink.ParseAddr(hostCIDR)
	must(t, netlink.AddrAdd(host, a))
	must(t, netlink.LinkSetUp(host))

	nh, err := netlink.NewHandleAt(ns)
	must(t, err)
	defer nh.Close()
	in, err := nh.LinkByName(name + "p")
	must(t, err)
	pa, _ := netlink.ParseAddr(podCIDR)
	must(t, nh.AddrAdd(in, pa))
	must(t, nh.LinkSetUp(in))
	inLo, err := nh.LinkByName("lo")
	must(t, err)
	must(t, nh.LinkSetUp(inLo))
	must(t, nh.RouteAdd(&netlink.Route{Gw: a.IP}))
	return ns
}

// inNS runs open with this goroutine's thread in ns: the socket it creates
// stays in ns.
func inNS[T any](t *testing.T, ns netns.NsHandle, open func() (T, error)) T {
	t.Helper()
	v, err := inNSErr(ns, open)
	if err != nil {
		t.Errorf("in pod netns: %v", err)
	}
	return v
}

func inNSErr[T any](ns netns.NsHandle, open func() (T, error)) (T, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var zero T
	root, err := netns.Get()
	if err != nil {
		return zero, err
	}
	defer root.Close()
	if err := netns.Set(ns); err != nil {
		return zero, err
	}
	defer func() { _ = netns.Set(root) }()
	return open()
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
