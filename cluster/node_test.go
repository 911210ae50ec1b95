package cluster

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestNodeReady(t *testing.T) {
	cond := func(typ corev1.NodeConditionType, st corev1.ConditionStatus) corev1.NodeCondition {
		return corev1.NodeCondition{Type: typ, Status: st}
	}
	for _, c := range []struct {
		name  string
		conds []corev1.NodeCondition
		want  bool
	}{
		{"no conditions", nil, false},
		{"ready", []corev1.NodeCondition{cond(corev1.NodeMemoryPressure, corev1.ConditionFalse), cond(corev1.NodeReady, corev1.ConditionTrue)}, true},
		{"not ready", []corev1.NodeCondition{cond(corev1.NodeReady, corev1.ConditionFalse)}, false},
		{"unknown", []corev1.NodeCondition{cond(corev1.NodeReady, corev1.ConditionUnknown)}, false},
		{"other conditions only", []corev1.NodeCondition{cond(corev1.NodeDiskPressure, corev1.ConditionTrue)}, false},
	} {
		if got := NodeReady(&corev1.Node{Status: corev1.NodeStatus{Conditions: c.conds}}); got != c.want {
			t.Errorf("%s: NodeReady = %v, want %v", c.name, got, c.want)
		}
	}
}
