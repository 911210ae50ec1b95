package cluster

import corev1 "k8s.io/api/core/v1"

// NodeReady reports whether a Node's Ready condition is True (false when it
// has none): the one reading of readiness for every component that picks
// nodes (ingress status, the load balancer, knit doctor).
func NodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
