package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/lab"
)

// query asks the cluster DNS IP from inside netns.
func query(netns, name string, qtype uint16) (*dns.Msg, error) {
	conn, err := lab.DialFrom(context.Background(), netns, "udp", hostport(lab.ClusterDNS, 53))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.SetEdns0(1232, false)
	dc := &dns.Conn{Conn: conn}
	if err := dc.WriteMsg(m); err != nil {
		return nil, err
	}
	return dc.ReadMsg()
}

// TestDNS covers the DNS issue's end-to-end checks, from a pod on every node.
func TestDNS(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "dns-e2e")
	ctx := context.Background()
	var nodes []string
	for _, n := range c.Nodes {
		nodes = append(nodes, n.Name)
	}
	pods := echoPods(t, c, ns, "dnsweb", nodes...)
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, lab.EchoService(ns, "web", "dnsweb"), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	headless := lab.EchoService(ns, "db", "dnsweb")
	headless.Spec.ClusterIP = corev1.ClusterIPNone
	if _, err := c.Client.CoreV1().Services(ns).Create(ctx, headless, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ext := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "ext", Namespace: ns},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "www.example.test"}}
	if _, err := c.Client.CoreV1().Services(ns).Create(ctx, ext, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitEndpoints(t, c, ns, "db", len(pods))
	fq := func(s string) string { return s + "." + ns + ".svc.cluster.local." }

	for _, p := range pods {
		netns := lab.PodNetns(p)
		t.Run("from "+p.Spec.NodeName, func(t *testing.T) {
			// Search path, as a program in the pod resolves "web".
			if err := eventually(3*time.Second, func() error {
				out, err := inNetns(ctx, netns, c.KnitBinary(), "lab", "resolve", "web")
				if err != nil || strings.TrimSpace(out) != svc.Spec.ClusterIP {
					return fmt.Errorf("resolve web: %q %v", out, err)
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
			check := func(name string, qtype uint16, rcode int, wantAnswers int, contains string) {
				t.Helper()
				var m *dns.Msg
				err := eventually(3*time.Second, func() error {
					var err error
					m, err = query(netns, name, qtype)
					if err != nil {
						return err
					}
					if m.Rcode != rcode || len(m.Answer) < wantAnswers || (contains != "" && !strings.Contains(fmt.Sprint(m.Answer), contains)) {
						return fmt.Errorf("%s %s: rcode %s, answers %v", name, dns.TypeToString[qtype], dns.RcodeToString[m.Rcode], m.Answer)
					}
					return nil
				})
				if err != nil {
					t.Error(err)
				}
			}
			check(fq("web"), dns.TypeA, dns.RcodeSuccess, 1, svc.Spec.ClusterIP)
			check(fq("db"), dns.TypeA, dns.RcodeSuccess, len(pods), pods[0].Status.PodIP)
			check("_http._tcp."+fq("web"), dns.TypeSRV, dns.RcodeSuccess, 1, fq("web"))
			check("_http._tcp."+fq("db"), dns.TypeSRV, dns.RcodeSuccess, len(pods), "")
			rev, _ := dns.ReverseAddr(svc.Spec.ClusterIP)
			check(rev, dns.TypePTR, dns.RcodeSuccess, 1, fq("web"))
			check(fq("ext"), dns.TypeCNAME, dns.RcodeSuccess, 1, "www.example.test.")
			check("www.example.test.", dns.TypeA, dns.RcodeSuccess, 1, lab.UpstreamAnswer)
			check("nx.example.test.", dns.TypeA, dns.RcodeNameError, 0, "")
			check(fq("missing"), dns.TypeA, dns.RcodeNameError, 0, "")
			check("dns-version.cluster.local.", dns.TypeTXT, dns.RcodeSuccess, 1, "1.1.0")
		})
	}

	t.Run("create and delete within 1s", func(t *testing.T) {
		netns := lab.PodNetns(pods[0])
		start := time.Now()
		s, err := c.Client.CoreV1().Services(ns).Create(ctx, lab.EchoService(ns, "fresh", "dnsweb"), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := eventually(time.Second, func() error {
			m, err := query(netns, fq("fresh"), dns.TypeA)
			if err != nil || m.Rcode != dns.RcodeSuccess || len(m.Answer) == 0 {
				return fmt.Errorf("not yet: %v %v", m, err)
			}
			return nil
		}); err != nil {
			t.Errorf("new Service not resolvable within 1s: %v", err)
		}
		t.Logf("created -> resolvable in %v", time.Since(start))
		_ = s
		if err := c.Client.CoreV1().Services(ns).Delete(ctx, "fresh", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := eventually(time.Second, func() error {
			m, err := query(netns, fq("fresh"), dns.TypeA)
			if err != nil || m.Rcode != dns.RcodeNameError {
				return fmt.Errorf("not NXDOMAIN yet: %v %v", m, err)
			}
			return nil
		}); err != nil {
			t.Errorf("deleted Service not NXDOMAIN within 1s: %v", err)
		}
	})
}

// TestDNSRestartGuard: while a node's agent restarts, queries to the
// cluster DNS IP from its pods are dropped (the knit-dns table), not
// refused, so a resolver that retries gets its answer once DNS is back
// instead of failing at once.
func TestDNSRestartGuard(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	ns := namespace(t, c, "dns-guard")
	n := c.Nodes[0]
	pod := echoPods(t, c, ns, "dnsguard", n.Name)[0]
	netns := lab.PodNetns(pod)
	const name = "kubernetes.default.svc.cluster.local"
	if _, err := query(netns, name, dns.TypeA); err != nil {
		t.Fatalf("query before the restart: %v", err)
	}
	out, err := n.Exec(ctx, "nft", "list", "table", "inet", "knit-dns")
	if err != nil || !strings.Contains(out, lab.ClusterDNS+" . 53") {
		t.Fatalf("no restart guard for %s:53 on %s: %v\n%s", lab.ClusterDNS, n.Name, err, out)
	}

	n.StopAgent()
	running := false
	t.Cleanup(func() {
		if !running {
			if err := n.StartAgent(); err == nil {
				_ = n.WaitAgentReady(ctx, 2*time.Minute)
			}
		}
	})
	_, err = query(netns, name, dns.TypeA)
	var ne net.Error
	switch {
	case err == nil:
		t.Fatal("answered while the agent was stopped")
	case errors.Is(err, syscall.ECONNREFUSED):
		t.Fatalf("query refused while the agent was stopped (the guard should drop it): %v", err)
	case !errors.As(err, &ne) || !ne.Timeout():
		t.Errorf("query while the agent was stopped: %v, want a timeout", err)
	}

	// A resolver retrying (each try waits 2 s) gets its answer once the
	// agent is back, and is never refused on the way.
	done := make(chan error, 1)
	go func() {
		deadline := time.Now().Add(90 * time.Second)
		for {
			_, err := query(netns, name, dns.TypeA)
			if err == nil || errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
				done <- err
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	if err := n.StartAgent(); err != nil {
		t.Fatal(err)
	}
	running = true
	if err := <-done; err != nil {
		t.Fatalf("query across the restart: %v", err)
	}
	if err := n.WaitAgentReady(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
}
