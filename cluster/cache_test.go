package cluster

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

func TestSlim(t *testing.T) {
	tests := []struct {
		name  string
		in    any
		check func(t *testing.T, out any)
	}{
		{
			name: "service loses managedFields and last-applied, keeps other annotations",
			in: &corev1.Service{ObjectMeta: metav1.ObjectMeta{
				Name:          "s",
				ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}},
				Annotations:   map[string]string{lastApplied: "{...}", "keep": "me"},
			}},
			check: func(t *testing.T, out any) {
				s := out.(*corev1.Service)
				if s.ManagedFields != nil || s.Annotations[lastApplied] != "" || s.Annotations["keep"] != "me" {
					t.Errorf("got %+v", s.ObjectMeta)
				}
			},
		},
		{
			name: "pod keeps only what components read",
			in: &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", Labels: map[string]string{"app": "x"},
					Annotations: map[string]string{"big": "x"}},
				Spec: corev1.PodSpec{NodeName: "n1", Hostname: "h", Subdomain: "sub",
					Containers: []corev1.Container{{Name: "c", Image: "img"}}},
				Status: corev1.PodStatus{
					Phase: corev1.PodRunning, PodIP: "10.42.0.2", PodIPs: []corev1.PodIP{{IP: "10.42.0.2"}},
					Conditions: []corev1.PodCondition{
						{Type: corev1.PodScheduled, Status: corev1.ConditionTrue},
						{Type: corev1.PodReady, Status: corev1.ConditionFalse, Reason: "ReadinessFailed"},
					},
					ContainerStatuses: []corev1.ContainerStatus{{Name: "c"}},
				},
			},
			check: func(t *testing.T, out any) {
				p := out.(*corev1.Pod)
				if len(p.Spec.Containers) != 0 || len(p.Status.ContainerStatuses) != 0 || p.Annotations != nil {
					t.Errorf("pod not slimmed: %+v", p)
				}
				if p.Spec.NodeName != "n1" || p.Spec.Hostname != "h" || p.Spec.Subdomain != "sub" ||
					p.Status.PodIP != "10.42.0.2" || len(p.Status.PodIPs) != 1 || p.Labels["app"] != "x" {
					t.Errorf("pod lost a field knit reads: %+v", p)
				}
				if len(p.Status.Conditions) != 1 || p.Status.Conditions[0].Type != corev1.PodReady || p.Status.Conditions[0].Reason != "ReadinessFailed" {
					t.Errorf("want only the Ready condition, got %+v", p.Status.Conditions)
				}
			},
		},
		{
			name: "node loses images",
			in: &corev1.Node{Status: corev1.NodeStatus{
				Images:    []corev1.ContainerImage{{Names: []string{"a"}, SizeBytes: 1}},
				Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "198.18.0.1"}},
			}},
			check: func(t *testing.T, out any) {
				n := out.(*corev1.Node)
				if n.Status.Images != nil || len(n.Status.Addresses) != 1 {
					t.Errorf("got %+v", n.Status)
				}
			},
		},
		{
			name: "endpointslice loses targetRefs, owners and annotations but the trigger time",
			in: &discoveryv1.EndpointSlice{
				ObjectMeta: metav1.ObjectMeta{Name: "s-abcde", Namespace: "ns",
					Labels:          map[string]string{discoveryv1.LabelServiceName: "s"},
					OwnerReferences: []metav1.OwnerReference{{Kind: "Service", Name: "s"}},
					Annotations: map[string]string{
						corev1.EndpointsLastChangeTriggerTime: "2026-12-04T21:00:00Z",
						"other":                               "x",
					}},
				Endpoints: []discoveryv1.Endpoint{{
					Addresses:          []string{"10.42.0.2"},
					Conditions:         discoveryv1.EndpointConditions{Ready: new(true)},
					Hostname:           new("h"),
					NodeName:           new("n1"),
					Zone:               new("z"),
					Hints:              &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "z"}}},
					TargetRef:          &corev1.ObjectReference{Kind: "Pod", Namespace: "ns", Name: "p"},
					DeprecatedTopology: map[string]string{"k": "v"},
				}},
			},
			check: func(t *testing.T, out any) {
				s := out.(*discoveryv1.EndpointSlice)
				e := s.Endpoints[0]
				if e.TargetRef != nil || e.DeprecatedTopology != nil || s.OwnerReferences != nil {
					t.Errorf("slice not slimmed: %+v", s)
				}
				if len(s.Annotations) != 1 || s.Annotations[corev1.EndpointsLastChangeTriggerTime] == "" {
					t.Errorf("annotations: got %v, want only the trigger time", s.Annotations)
				}
				if s.Labels[discoveryv1.LabelServiceName] != "s" || e.Addresses[0] != "10.42.0.2" || !*e.Conditions.Ready ||
					*e.Hostname != "h" || *e.NodeName != "n1" || *e.Zone != "z" || e.Hints == nil {
					t.Errorf("slice lost a field knit reads: %+v", s)
				}
			},
		},
		{
			// UpdateStatus writes metadata too: what is dropped here
			// would be deleted on the server by the ingress's status write.
			name: "ingress keeps its annotations (written back by UpdateStatus)",
			in: &networkingv1.Ingress{ObjectMeta: metav1.ObjectMeta{
				Name:            "i",
				ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubectl"}},
				OwnerReferences: []metav1.OwnerReference{{Kind: "Thing", Name: "t"}},
				Annotations:     map[string]string{lastApplied: "{...}"},
			}},
			check: func(t *testing.T, out any) {
				i := out.(*networkingv1.Ingress)
				if i.ManagedFields != nil || i.Annotations[lastApplied] == "" || len(i.OwnerReferences) != 1 {
					t.Errorf("got %+v", i.ObjectMeta)
				}
			},
		},
		{
			name: "tombstones pass through",
			in:   cache.DeletedFinalStateUnknown{Key: "ns/x"},
			check: func(t *testing.T, out any) {
				if _, ok := out.(cache.DeletedFinalStateUnknown); !ok {
					t.Errorf("got %T", out)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := Slim(tt.in)
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, out)
		})
	}
}
