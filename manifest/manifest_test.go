package manifest

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
)

var update = flag.Bool("update", false, "rewrite deploy/knit.yaml from DefaultConfig")

const golden = "../deploy/knit.yaml"

// TestGolden: the checked-in deploy/knit.yaml is Render(DefaultConfig()).
// After a deliberate change: go test ./manifest -update (or make manifest).
func TestGolden(t *testing.T) {
	got, err := Render(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is not what Render(DefaultConfig()) gives; run `go test ./manifest -update` and review the diff", golden)
	}
}

// decodeAll decodes every document strictly (unknown fields are errors)
// into typed objects, as a YAML reader of the file would.
func decodeAll(t *testing.T, y []byte) []runtime.Object {
	t.Helper()
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	var out []runtime.Object
	for i, doc := range strings.Split(string(y), "\n---\n")[1:] {
		obj, _, err := codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("document %d: %v\n%s", i, err, doc)
		}
		out = append(out, obj)
	}
	return out
}

func TestDocumentsDecode(t *testing.T) {
	y, err := Render(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	objs := decodeAll(t, y)
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, o.GetObjectKind().GroupVersionKind().Kind)
	}
	want := "Namespace ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding Role RoleBinding ConfigMap DaemonSet Service IngressClass"
	if strings.Join(kinds, " ") != want {
		t.Errorf("kinds = %v, want %s", kinds, want)
	}
}

func find[T runtime.Object](objs []runtime.Object) T {
	for _, o := range objs {
		if x, ok := o.(T); ok {
			return x
		}
	}
	var zero T
	return zero
}

func TestRBACIsLeastPrivilege(t *testing.T) {
	objs, err := Objects(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	cr := find[*rbacv1.ClusterRole](objs)
	writes := map[string]bool{}
	for _, r := range cr.Rules {
		for _, f := range [][]string{r.APIGroups, r.Resources, r.Verbs} {
			for _, v := range f {
				if v == "*" {
					t.Errorf("wildcard in rule %+v", r)
				}
			}
		}
		for _, v := range r.Verbs {
			if v != "get" && v != "list" && v != "watch" {
				for _, res := range r.Resources {
					writes[res+":"+v] = true
				}
			}
		}
	}
	want := map[string]bool{"nodes:patch": true, "ingresses/status:patch": true, "services/status:patch": true, "events:create": true, "events:patch": true}
	if len(writes) != len(want) {
		t.Errorf("ClusterRole writes %v, want exactly %v", writes, want)
	}
	for w := range want {
		if !writes[w] {
			t.Errorf("ClusterRole lacks %s", w)
		}
	}
	role := find[*rbacv1.Role](objs)
	if role.Namespace != "kube-system" || role.Name != "knit-leases" {
		t.Errorf("lease Role %s/%s", role.Namespace, role.Name)
	}
	for _, r := range role.Rules {
		named := slices.Equal(r.ResourceNames, []string{"knit-ingress-status", "knit-lb"})
		for _, v := range r.Verbs {
			if v != "create" && !named {
				t.Errorf("lease verb %s not limited to the one Lease: %+v", v, r)
			}
		}
	}
}

func TestConfigFlowsIntoObjects(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Namespace = "net"
	cfg.Image = "registry.example/knit:v1"
	cfg.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10::/56")}
	cfg.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00:20::/112")}
	cfg.ClusterDNS = []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:20::a")}
	cfg.APIServer = "192.0.2.1:6443"
	y, err := Render(cfg)
	if err != nil {
		t.Fatal(err)
	}
	objs := decodeAll(t, y)

	cm := find[*corev1.ConfigMap](objs)
	if cm.Namespace != "net" || cm.Data["cluster-cidr"] != "10.244.0.0/16,fd00:10::/56" ||
		cm.Data["service-cidr"] != "10.96.0.0/12,fd00:20::/112" || cm.Data["cluster-dns"] != "10.96.0.10,fd00:20::a" {
		t.Errorf("ConfigMap %s: %v", cm.Namespace, cm.Data)
	}
	ds := find[*appsv1.DaemonSet](objs)
	if ds.Namespace != "net" {
		t.Errorf("DaemonSet namespace %s", ds.Namespace)
	}
	spec := ds.Spec.Template.Spec
	if spec.Containers[0].Image != cfg.Image || spec.InitContainers[0].Image != cfg.Image {
		t.Errorf("images %s, %s", spec.Containers[0].Image, spec.InitContainers[0].Image)
	}
	env := map[string]string{}
	for _, e := range spec.Containers[0].Env {
		env[e.Name] = e.Value
	}
	if env["KUBERNETES_SERVICE_HOST"] != "192.0.2.1" || env["KUBERNETES_SERVICE_PORT"] != "6443" {
		t.Errorf("API server env: %v", env)
	}
	def, _ := Objects(DefaultConfig())
	if ds.Spec.Template.Annotations[ConfigHashAnnotation] == find[*appsv1.DaemonSet](def).Spec.Template.Annotations[ConfigHashAnnotation] {
		t.Error("config hash did not change with the settings")
	}
	svc := find[*corev1.Service](objs)
	if svc.Spec.ClusterIP != "10.96.0.10" || len(svc.Spec.ClusterIPs) != 2 || svc.Spec.ClusterIPs[1] != "fd00:20::a" ||
		svc.Spec.IPFamilyPolicy == nil || *svc.Spec.IPFamilyPolicy != corev1.IPFamilyPolicyRequireDualStack {
		t.Errorf("kube-dns spec: %+v", svc.Spec)
	}
	for _, o := range objs {
		switch b := o.(type) {
		case *rbacv1.ClusterRoleBinding:
			if b.Subjects[0].Namespace != "net" {
				t.Errorf("ClusterRoleBinding subject namespace %s", b.Subjects[0].Namespace)
			}
		case *rbacv1.RoleBinding:
			if b.Subjects[0].Namespace != "net" {
				t.Errorf("RoleBinding subject namespace %s", b.Subjects[0].Namespace)
			}
		}
	}
}

func TestValidate(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	for _, tt := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"dns outside services", func(c *Config) { c.ClusterDNS = []netip.Addr{a("10.42.0.10")} }, "not in the service CIDR"},
		{"overlap", func(c *Config) { c.ServiceCIDRs = []netip.Prefix{p("10.0.0.0/8")} }, "overlaps"},
		{"two v4", func(c *Config) { c.ClusterCIDRs = []netip.Prefix{p("10.42.0.0/16"), p("10.44.0.0/16")} }, "one IP family"},
		{"three", func(c *Config) { c.ClusterDNS = []netip.Addr{a("10.43.0.10"), a("10.43.0.11"), a("10.43.0.12")} }, "one address or prefix per IP family"},
		{"no dns", func(c *Config) { c.ClusterDNS = nil }, "cluster DNS"},
		{"empty image", func(c *Config) { c.Image = "" }, "must not be empty"},
		{"bad apiserver", func(c *Config) { c.APIServer = "https://x" }, "want host:port"},
		{"apiserver port", func(c *Config) { c.APIServer = "x:99999" }, "want host:port"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tt.mod(&cfg)
			_, err := Render(cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Render: %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestAnnotate(t *testing.T) {
	y := []byte("a:\n- x\n- y\n- x\n")
	if got, err := annotate(y, map[string]string{"- y": "why"}); err != nil || string(got) != "a:\n- x\n- y # why\n- x\n" {
		t.Errorf("annotate = %q, %v", got, err)
	}
	if _, err := annotate(y, map[string]string{"- x": "ambiguous"}); err == nil {
		t.Error("a comment matching two lines was accepted")
	}
	if _, err := annotate(y, map[string]string{"- z": "lost"}); err == nil {
		t.Error("a comment matching no line was accepted")
	}
}
