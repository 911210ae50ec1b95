package lab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"

	"knit.dev/knit/lab/echo"
)

// EchoPod is a Pod running the echo workload on the given node. There is no
// scheduler in the lab: spec.nodeName is set directly.
func EchoPod(namespace, name, node string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName: node,
			Containers: []corev1.Container{{
				Name:  "echo",
				Image: "knit.dev/lab-echo",
				Ports: []corev1.ContainerPort{
					{Name: "http", ContainerPort: echo.HTTPPort, Protocol: corev1.ProtocolTCP},
					{Name: "tcp-echo", ContainerPort: echo.TCPPort, Protocol: corev1.ProtocolTCP},
					{Name: "udp-echo", ContainerPort: echo.UDPPort, Protocol: corev1.ProtocolUDP},
				},
			}},
		},
	}
}

// EchoService selects pods labelled app=<app> and exposes the echo ports.
func EchoService(namespace, name, app string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": app},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP},
				{Name: "tcp-echo", Port: 9000, TargetPort: intstr.FromInt32(echo.TCPPort), Protocol: corev1.ProtocolTCP},
				{Name: "udp-echo", Port: 9001, TargetPort: intstr.FromInt32(echo.UDPPort), Protocol: corev1.ProtocolUDP},
			},
		},
	}
}

// EnsureNamespace creates a namespace if it does not exist.
func (c *Cluster) EnsureNamespace(ctx context.Context, name string) error {
	_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	// Pod admission needs the namespace's default ServiceAccount, which
	// kube-controller-manager creates a moment later.
	return wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := c.Client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
}

// WaitPodRunning waits until the pod has an IP and, if ready is true, the
// Ready condition.
func (c *Cluster) WaitPodRunning(ctx context.Context, namespace, name string, ready bool, timeout time.Duration) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		p, err := c.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		if p.Status.PodIP == "" {
			return false, nil
		}
		return !ready || IsPodReady(p), nil
	})
	if err != nil {
		return pod, fmt.Errorf("pod %s/%s not running (ready=%v) after %v", namespace, name, ready, timeout)
	}
	return pod, nil
}

// WaitPodGone waits until the pod object is deleted.
func (c *Cluster) WaitPodGone(ctx context.Context, namespace, name string, timeout time.Duration) error {
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		_, err := c.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

// IsPodReady reports the pod's Ready condition.
func IsPodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// ReadyEndpointIPs lists the ready endpoint addresses of a Service's
// EndpointSlices.
func (c *Cluster) ReadyEndpointIPs(ctx context.Context, namespace, service string) ([]string, error) {
	slices, err := c.Client.DiscoveryV1().EndpointSlices(namespace).List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=" + service,
	})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range slices.Items {
		for _, e := range s.Endpoints {
			if e.Conditions.Ready != nil && *e.Conditions.Ready {
				out = append(out, e.Addresses...)
			}
		}
	}
	return out, nil
}

// PodNetns is the netns path the simulated kubelet made for the pod.
func PodNetns(p *corev1.Pod) string { return "/run/netns/pod-" + string(p.UID)[:8] }

// NodeNetns is the netns path of a lab node.
func (n *Node) Netns() string { return "/run/netns/" + n.Name }

// DialFrom dials from inside the network namespace at netnsPath: the socket
// is created on a thread switched into that netns, so the connection belongs
// to it (what containernetworking's ns.Do is for).
func DialFrom(ctx context.Context, netnsPath, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// HTTPClientFrom is an HTTP client whose connections start in netnsPath.
// Keep-alives are off so that every request is a new connection (and a
// new trip through the Service rules).
func HTTPClientFrom(netnsPath string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return DialFrom(ctx, netnsPath, network, addr)
			},
		},
	}
}
