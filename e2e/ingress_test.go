package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestIngress sends requests from outside the cluster (the sandbox root) to
// a node's port 80 with different Host headers and checks they reach the
// Service the Ingress names, and that unknown hosts get 404.
func TestIngress(t *testing.T) {
	c := cluster(t)
	ns := namespace(t, c, "ingress-e2e")
	ctx := context.Background()
	echoPods(t, c, ns, "blue", c.Nodes[1].Name)
	echoPods(t, c, ns, "green", c.Nodes[2].Name)
	for _, app := range []string{"blue", "green"} {
		svc := labEchoService(ns, app)
		if _, err := c.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitEndpoints(t, c, ns, app, 1)
	}
	prefix := networkingv1.PathTypePrefix
	rule := func(host, svc string) networkingv1.IngressRule {
		return networkingv1.IngressRule{Host: host, IngressRuleValue: networkingv1.IngressRuleValue{HTTP: &networkingv1.HTTPIngressRuleValue{
			Paths: []networkingv1.HTTPIngressPath{{Path: "/", PathType: &prefix, Backend: networkingv1.IngressBackend{
				Service: &networkingv1.IngressServiceBackend{Name: svc, Port: networkingv1.ServiceBackendPort{Name: "http"}},
			}}},
		}}}
	}
	ing := &networkingv1.Ingress{
		ObjectMeta: metav1.ObjectMeta{Name: "colors", Namespace: ns},
		Spec:       networkingv1.IngressSpec{Rules: []networkingv1.IngressRule{rule("blue.example", "blue"), rule("green.example", "green")}},
	}
	if _, err := c.Client.NetworkingV1().Ingresses(ns).Create(ctx, ing, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: 3 * time.Second}
	get := func(nodeIP, host string) (int, string, error) {
		req, _ := http.NewRequest("GET", "http://"+nodeIP+"/anything", nil)
		req.Host = host
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	for _, n := range c.Nodes {
		for host, pod := range map[string]string{"blue.example": "blue-0-" + c.Nodes[1].Name, "green.example": "green-0-" + c.Nodes[2].Name} {
			if err := eventually(5*time.Second, func() error {
				code, body, err := get(n.IP, host)
				if err != nil {
					return err
				}
				if code != 200 || !contains(body, `"pod":"`+pod+`"`) {
					return fmt.Errorf("status %d body %s", code, body)
				}
				return nil
			}); err != nil {
				t.Errorf("via %s Host %s: want pod %s: %v", n.Name, host, pod, err)
			}
		}
		if code, _, err := get(n.IP, "unknown.example"); err != nil || code != 404 {
			t.Errorf("via %s unknown host: status %d, %v; want 404", n.Name, code, err)
		}
	}
}
