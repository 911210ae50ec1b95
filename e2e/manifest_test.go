package e2e

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"testing"

	authorizationv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"knit.dev/knit/manifest"
)

// TestManifestServerDryRun sends every document of deploy/knit.yaml to the
// lab's real API server with dryRun=All: full validation, defaulting and
// admission (RBAC escalation checks, the Service IP allocator, Pod Security
// labels), nothing stored. The kube-dns Service and the knit IngressClass
// exist in the lab already (it makes them), so those are dry-run updates of
// the live objects instead. The knit-system Namespace is created for real
// if missing, after its own dry run: a namespaced object cannot even be
// dry-run into a namespace that does not exist.
func TestManifestServerDryRun(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	y, err := os.ReadFile("../deploy/knit.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Client.Discovery()))
	dryRun := []string{metav1.DryRunAll}

	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(y), 4096)
	var kinds []string
	for {
		obj := &unstructured.Unstructured{}
		if err := dec.Decode(&obj.Object); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("decode: %v", err)
		}
		if len(obj.Object) == 0 {
			continue
		}
		gvk := obj.GroupVersionKind()
		kinds = append(kinds, gvk.Kind)
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s: %v", gvk, err)
		}
		var res dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			res = dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
		}
		name := gvk.Kind + " " + obj.GetNamespace() + "/" + obj.GetName()

		_, err = res.Create(ctx, obj, metav1.CreateOptions{DryRun: dryRun, FieldValidation: "Strict"})
		switch {
		case err == nil:
			t.Logf("%s: dry-run create ok", name)
		case apierrors.IsAlreadyExists(err):
			live, err := res.Get(ctx, obj.GetName(), metav1.GetOptions{})
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			obj.SetResourceVersion(live.GetResourceVersion())
			if _, err := res.Update(ctx, obj, metav1.UpdateOptions{DryRun: dryRun, FieldValidation: "Strict"}); err != nil {
				t.Errorf("%s: dry-run update of the live object: %v", name, err)
				continue
			}
			t.Logf("%s: exists; dry-run update ok", name)
		default:
			t.Errorf("%s: dry-run create: %v", name, err)
			continue
		}
		if gvk.Kind == "Namespace" {
			if _, err := c.Client.CoreV1().Namespaces().Get(ctx, obj.GetName(), metav1.GetOptions{}); apierrors.IsNotFound(err) {
				// For the namespaced documents that follow.
				if _, err := res.Create(ctx, obj, metav1.CreateOptions{}); err != nil {
					t.Fatalf("create namespace %s: %v", obj.GetName(), err)
				}
			}
		}
	}
	if len(kinds) != 12 {
		t.Errorf("sent %d documents (%v), want the manifest's 12", len(kinds), kinds)
	}

	// The checked-in file is the renderer's output, so what passed here is
	// what `knit manifest` prints with defaults (manifest.TestGolden).
	if want, err := manifest.Render(manifest.DefaultConfig()); err != nil || !bytes.Equal(want, y) {
		t.Errorf("deploy/knit.yaml is not manifest.Render(DefaultConfig()) (%v)", err)
	}
}

// TestManifestRBAC applies the manifest's RBAC objects for real and asks
// the API server (SubjectAccessReview) whether the agent's ServiceAccount
// may do each request the agent makes, and may not do a few it must not.
// The objects are deleted afterwards.
func TestManifestRBAC(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	objs, err := manifest.Objects(manifest.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Client.Discovery()))
	for _, o := range objs {
		u := &unstructured.Unstructured{}
		if u.Object, err = runtime.DefaultUnstructuredConverter.ToUnstructured(o); err != nil {
			t.Fatal(err)
		}
		switch u.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
		case "Namespace":
			if _, err := c.Client.CoreV1().Namespaces().Get(ctx, u.GetName(), metav1.GetOptions{}); err == nil {
				continue // made by TestManifestServerDryRun, or by an earlier run
			}
		default:
			continue
		}
		gvk := u.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatal(err)
		}
		var res dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			res = dyn.Resource(m.Resource).Namespace(u.GetNamespace())
		}
		if _, err := res.Create(ctx, u, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("create %s %s: %v", u.GetKind(), u.GetName(), err)
		}
		if u.GetKind() != "Namespace" {
			name := u.GetName()
			t.Cleanup(func() { _ = res.Delete(context.Background(), name, metav1.DeleteOptions{}) })
		}
	}

	user := "system:serviceaccount:" + manifest.DefaultNamespace + ":" + manifest.Name
	type req struct {
		verb, group, resource, sub, ns, name string
		allowed                              bool
	}
	reqs := []req{
		// What the components do (cluster/cache.go, overlay, ingress).
		{"list", "", "nodes", "", "", "", true},
		{"watch", "", "nodes", "", "", "", true},
		{"get", "", "nodes", "", "", "node1", true},
		{"patch", "", "nodes", "", "", "node1", true},
		{"list", "", "pods", "", "", "", true},
		{"watch", "", "services", "", "", "", true},
		{"list", "", "secrets", "", "", "", true},
		{"watch", "discovery.k8s.io", "endpointslices", "", "", "", true},
		{"list", "networking.k8s.io", "ingresses", "", "", "", true},
		{"watch", "networking.k8s.io", "ingressclasses", "", "", "", true},
		{"patch", "networking.k8s.io", "ingresses", "status", "default", "web", true},
		{"create", "", "events", "", "default", "", true},
		{"patch", "", "events", "", "default", "x", true},
		{"create", "coordination.k8s.io", "leases", "", "kube-system", "", true},
		{"get", "coordination.k8s.io", "leases", "", "kube-system", "knit-ingress-status", true},
		{"update", "coordination.k8s.io", "leases", "", "kube-system", "knit-ingress-status", true},
		{"get", "coordination.k8s.io", "leases", "", "kube-system", "knit-lb", true},
		{"update", "coordination.k8s.io", "leases", "", "kube-system", "knit-lb", true},
		{"patch", "", "services", "status", "default", "x", true},
		// The node status Leases (package status) in knit's own namespace.
		{"create", "coordination.k8s.io", "leases", "", "knit-system", "", true},
		{"get", "coordination.k8s.io", "leases", "", "knit-system", "knit-node-node1", true},
		{"update", "coordination.k8s.io", "leases", "", "knit-system", "knit-node-node1", true},
		{"list", "coordination.k8s.io", "leases", "", "knit-system", "", true},
		// What it must not.
		{"delete", "coordination.k8s.io", "leases", "", "knit-system", "knit-node-node1", false},
		{"update", "coordination.k8s.io", "leases", "", "kube-node-lease", "node1", false},
		{"update", "coordination.k8s.io", "leases", "", "kube-system", "kube-controller-manager", false},
		{"get", "coordination.k8s.io", "leases", "", "default", "knit-ingress-status", false},
		{"update", "", "nodes", "", "", "node1", false},
		{"delete", "", "nodes", "", "", "node1", false},
		{"patch", "", "nodes", "status", "", "node1", false},
		{"create", "", "pods", "", "default", "", false},
		{"update", "", "services", "", "default", "x", false},
		{"update", "", "services", "status", "default", "x", false},
		{"patch", "", "services", "", "default", "x", false},
		{"update", "networking.k8s.io", "ingresses", "", "default", "web", false},
		{"create", "", "secrets", "", "default", "", false},
	}
	for _, r := range reqs {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   user,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + manifest.DefaultNamespace, "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: r.verb, Group: r.group, Resource: r.resource, Subresource: r.sub, Namespace: r.ns, Name: r.name,
			},
		}}
		got, err := c.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status.Allowed != r.allowed {
			t.Errorf("%s %s/%s/%s in %q name %q: allowed=%v, want %v (%s)", r.verb, r.group, r.resource, r.sub, r.ns, r.name,
				got.Status.Allowed, r.allowed, got.Status.Reason)
		}
	}
}
