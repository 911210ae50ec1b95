package proxy

import (
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// TestMergeSlicesSharesOnlyWhatItWouldBuild: a Service's only slice's lists
// are used as they are (shared with the tracker) only when they equal what
// merging builds: sorted, each address once, each port once.
func TestMergeSlicesSharesOnlyWhatItWouldBuild(t *testing.T) {
	twoPorts := withSlicePorts(
		discoveryv1.EndpointPort{Name: ptr("a"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)},
		discoveryv1.EndpointPort{Name: ptr("b"), Port: ptr(int32(9090)), Protocol: ptr(corev1.ProtocolUDP)})
	samePortTwice := withSlicePorts(
		discoveryv1.EndpointPort{Name: ptr("a"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)},
		discoveryv1.EndpointPort{Name: ptr("a"), Port: ptr(int32(8081)), Protocol: ptr(corev1.ProtocolTCP)})
	tests := []struct {
		name   string
		slices []*discoveryv1.EndpointSlice
		shared bool
	}{
		{"one slice, unsorted", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 8080, []ep{{ip: "10.42.0.9"}, {ip: "10.42.0.10"}, {ip: "10.42.0.2"}}),
		}, true},
		{"one slice, two ports", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 0, []ep{{ip: "10.42.0.2"}, {ip: "10.42.0.1"}}, twoPorts),
		}, true},
		{"one slice, an address twice, the second terminating", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 8080, []ep{{ip: "10.42.0.2"}, {ip: "10.42.0.1"}, {ip: "10.42.0.2", terminating: true}}),
		}, false},
		{"one slice, an address twice, the first terminating", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 8080, []ep{{ip: "10.42.0.2", terminating: true}, {ip: "10.42.0.2", node: thisNode}}),
		}, false},
		{"one slice, a port name twice", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 0, []ep{{ip: "10.42.0.2"}, {ip: "10.42.0.1"}}, samePortTwice),
		}, false},
		{"one slice, no endpoints", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 8080, nil),
		}, true},
		{"two slices", []*discoveryv1.EndpointSlice{
			slice("ns", "s", "s-1", 8080, []ep{{ip: "10.42.0.2"}}),
			slice("ns", "s", "s-2", 8080, []ep{{ip: "10.42.0.1"}, {ip: "10.42.0.2", terminating: true}}),
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := map[string]*sliceInfo{}
			for _, s := range tc.slices {
				in[s.Name] = convertSlice(s, thisNode, quiet)
			}
			got, want := mergeSlices(in), mergeAll(in)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("mergeSlices:\n%+v\nmerging:\n%+v", got, want)
			}
			shared := false
			for _, s := range in {
				for _, p := range s.ports {
					for _, l := range got {
						shared = shared || (len(p.endpoints) > 0 && len(l.eps) > 0 && &p.endpoints[0] == &l.eps[0])
					}
				}
			}
			if shared != tc.shared && len(got) > 0 {
				t.Errorf("shared the slice's lists: %v, want %v", shared, tc.shared)
			}
		})
	}
}
