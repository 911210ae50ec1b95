// Package manifest renders knit's install manifest, deploy/knit.yaml: every
// object a cluster needs to run knit as its network, built as typed
// k8s.io/api structs so that a field name or a type cannot be wrong, then
// marshalled to YAML with a comment above each document that says why it is
// shaped the way it is.
//
//	Config (flags of `knit manifest`) --validate--> objects() --> one
//	document per object: header comment + YAML (sigs.k8s.io/yaml, via JSON,
//	empty and status fields pruned) + trailing comments on chosen lines
//	--> deploy/knit.yaml (the golden copy of the defaults, checked by tests)
//
// What it installs, in apply order: the knit-system Namespace, the
// ServiceAccount, a least-privilege ClusterRole and binding, a Role and
// binding for the Leases of the ingress status and load-balancer writers,
// the ConfigMap with the network settings, the DaemonSet, the kube-dns
// Service and the "knit" IngressClass.
// Names that the agent's code also knows (the ingress controller name, its
// Lease) come from the component packages, so the manifest cannot drift
// from the code.
package manifest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"knit.dev/knit/ingress"
	"knit.dev/knit/proxy/lb"
	"knit.dev/knit/status"
)

// Defaults: the lab's addresses (DESIGN.md), which are also k3s's.
const (
	DefaultNamespace     = "knit-system"
	DefaultImage         = "knit.dev/knit:latest"
	DefaultClusterCIDR   = "10.42.0.0/16"
	DefaultServiceCIDR   = "10.43.0.0/16"
	DefaultClusterDNS    = "10.43.0.10"
	DefaultClusterDomain = "cluster.local"

	// HealthPort is the agent's --health-addr port on 127.0.0.1 (its
	// default): /healthz, /readyz, /metrics.
	HealthPort = 9940
	// BinaryPath is where the image holds the knit binary (see hack/image).
	BinaryPath = "/usr/local/bin/knit"

	// Names of the objects knit owns.
	Name          = "knit" // ServiceAccount, ClusterRole(Binding), DaemonSet, IngressClass
	LeaseRoleName = "knit-leases"
	ConfigMapName = "knit-config"
	statusRole    = "knit-node-status" // Role(Binding) for the node status Leases
	// ConfigHashAnnotation on the pod template holds a hash of the
	// ConfigMap's data, so applying a manifest with other settings rolls
	// the DaemonSet (a ConfigMap change alone restarts nothing).
	ConfigHashAnnotation = "knit.dev/config-hash"
)

// Config is what `knit manifest` is told.
type Config struct {
	// Namespace holds the ServiceAccount, ConfigMap and DaemonSet
	// (default knit-system).
	Namespace string
	// Image is the knit image (default DefaultImage).
	Image string
	// ClusterCIDRs, ServiceCIDRs and ClusterDNS are the pod network, the
	// Service network and the cluster DNS Service IP(s): one per IP family.
	ClusterCIDRs []netip.Prefix
	ServiceCIDRs []netip.Prefix
	ClusterDNS   []netip.Addr
	// ClusterDomain is the DNS domain of the cluster (default cluster.local).
	ClusterDomain string
	// APIServer ("host:port", optional) is where the agent reaches the API
	// server without going through the `kubernetes` Service IP. knit is
	// the service proxy, so on a cluster without kube-proxy nothing else
	// programs that IP before the agent's first sync: set this there.
	APIServer string
}

// DefaultConfig is the configuration deploy/knit.yaml is rendered from.
func DefaultConfig() Config {
	return Config{
		Namespace:     DefaultNamespace,
		Image:         DefaultImage,
		ClusterCIDRs:  []netip.Prefix{netip.MustParsePrefix(DefaultClusterCIDR)},
		ServiceCIDRs:  []netip.Prefix{netip.MustParsePrefix(DefaultServiceCIDR)},
		ClusterDNS:    []netip.Addr{netip.MustParseAddr(DefaultClusterDNS)},
		ClusterDomain: DefaultClusterDomain,
	}
}

// validate checks what the objects rely on.
func (c Config) validate() error {
	if c.Namespace == "" || c.Image == "" || c.ClusterDomain == "" {
		return errors.New("namespace, image and cluster domain must not be empty")
	}
	for name, n := range map[string]int{"cluster CIDR": len(c.ClusterCIDRs), "service CIDR": len(c.ServiceCIDRs), "cluster DNS": len(c.ClusterDNS)} {
		if n == 0 || n > 2 {
			return fmt.Errorf("%s: want one address or prefix per IP family, got %d", name, n)
		}
	}
	if len(c.ClusterCIDRs) == 2 && c.ClusterCIDRs[0].Addr().Is4() == c.ClusterCIDRs[1].Addr().Is4() ||
		len(c.ServiceCIDRs) == 2 && c.ServiceCIDRs[0].Addr().Is4() == c.ServiceCIDRs[1].Addr().Is4() ||
		len(c.ClusterDNS) == 2 && c.ClusterDNS[0].Is4() == c.ClusterDNS[1].Is4() {
		return errors.New("two prefixes or addresses of one IP family: want at most one per family")
	}
	for _, ip := range c.ClusterDNS {
		in := false
		for _, p := range c.ServiceCIDRs {
			in = in || p.Contains(ip)
		}
		if !in {
			return fmt.Errorf("cluster DNS %s is not in the service CIDR(s) %s: it is a Service ClusterIP", ip, joinPrefixes(c.ServiceCIDRs))
		}
	}
	for _, cc := range c.ClusterCIDRs {
		for _, sc := range c.ServiceCIDRs {
			if cc.Overlaps(sc) {
				return fmt.Errorf("cluster CIDR %s overlaps service CIDR %s", cc, sc)
			}
		}
	}
	if c.APIServer != "" {
		host, port, err := net.SplitHostPort(c.APIServer)
		if _, perr := strconv.ParseUint(port, 10, 16); err != nil || host == "" || perr != nil {
			return fmt.Errorf("API server %q: want host:port", c.APIServer)
		}
	}
	return nil
}

// Render returns the manifest as a multi-document YAML stream.
func Render(cfg Config) ([]byte, error) {
	docs, err := documents(cfg)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.WriteString(fileHeader)
	for _, d := range docs {
		y, err := marshal(d.obj)
		if err != nil {
			return nil, err
		}
		if y, err = annotate(y, d.lineComments); err != nil {
			return nil, fmt.Errorf("%s: %w", d.obj.GetObjectKind().GroupVersionKind().Kind, err)
		}
		b.WriteString("---\n")
		b.WriteString(comment(d.header))
		b.Write(y)
	}
	return b.Bytes(), nil
}

// Objects returns the manifest's objects, in apply order.
func Objects(cfg Config) ([]runtime.Object, error) {
	docs, err := documents(cfg)
	if err != nil {
		return nil, err
	}
	out := make([]runtime.Object, len(docs))
	for i, d := range docs {
		out[i] = d.obj
	}
	return out, nil
}

const fileHeader = `# knit: the whole networking layer of a Kubernetes cluster in one DaemonSet
# (CNI plugin, VXLAN overlay, service proxy, cluster DNS, ingress).
#
# Generated by ` + "`knit manifest`" + ` (package knit.dev/knit/manifest); do not edit:
# re-render with other settings, e.g.
#   knit manifest --cluster-cidr 10.42.0.0/16 --service-cidr 10.43.0.0/16 \
#     --cluster-dns 10.43.0.10 --image registry.example/knit:v1 --apiserver 192.0.2.1:6443
# knit replaces kube-proxy and CoreDNS: remove those before applying this.
`

// document is one object of the manifest and the comments rendered with it.
type document struct {
	obj    runtime.Object
	header string
	// lineComments maps a YAML line (trimmed) to a comment appended to it;
	// every key must match exactly one line.
	lineComments map[string]string
}

func documents(cfg Config) ([]document, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ing := ingress.DefaultConfig()
	labels := map[string]string{"app.kubernetes.io/name": Name}
	settings := map[string]string{
		"cluster-cidr":    joinPrefixes(cfg.ClusterCIDRs),
		"service-cidr":    joinPrefixes(cfg.ServiceCIDRs),
		"cluster-dns":     joinAddrs(cfg.ClusterDNS),
		"cluster-domain":  cfg.ClusterDomain,
		"overlay-backend": "vxlan",
		"proxy-backend":   "auto",
		"log-level":       "info",
	}
	return []document{
		{
			obj: &corev1.Namespace{
				TypeMeta: typeMeta("v1", "Namespace"),
				ObjectMeta: metav1.ObjectMeta{Name: cfg.Namespace, Labels: merge(labels, map[string]string{
					"pod-security.kubernetes.io/enforce": "privileged",
				})},
			},
			header: `The agent runs with host networking, host paths and a privileged container
(see the DaemonSet), which only the "privileged" Pod Security level admits.`,
		},
		{
			obj: &corev1.ServiceAccount{
				TypeMeta:   typeMeta("v1", "ServiceAccount"),
				ObjectMeta: metav1.ObjectMeta{Name: Name, Namespace: cfg.Namespace, Labels: labels},
			},
			header: "The agent's identity towards the API server.",
		},
		clusterRole(labels),
		{
			obj: &rbacv1.ClusterRoleBinding{
				TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
				ObjectMeta: metav1.ObjectMeta{Name: Name, Labels: labels},
				RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: Name},
				Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: Name, Namespace: cfg.Namespace}},
			},
		},
		{
			obj: &rbacv1.Role{
				TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "Role"),
				ObjectMeta: metav1.ObjectMeta{Name: LeaseRoleName, Namespace: ing.LeaseNamespace, Labels: labels},
				Rules: []rbacv1.PolicyRule{
					{APIGroups: []string{coordinationv1.GroupName}, Resources: []string{"leases"}, Verbs: []string{"create"}},
					{APIGroups: []string{coordinationv1.GroupName}, Resources: []string{"leases"},
						ResourceNames: []string{ing.LeaseName, lb.DefaultLeaseName}, Verbs: []string{"get", "update"}},
				},
			},
			header: fmt.Sprintf(`One agent at a time writes Ingress status and Events (the holder of the
Lease %s/%s), and one writes the status of knit's
LoadBalancer Services (the holder of the Lease %s/%s).
A Role in that namespace rather than a ClusterRole rule: get and update
are limited to those two Leases; create cannot be limited by name (RBAC does
not know the name of an object that does not exist yet).`, ing.LeaseNamespace, ing.LeaseName, lb.DefaultLeaseNamespace, lb.DefaultLeaseName),
		},
		{
			obj: &rbacv1.RoleBinding{
				TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "RoleBinding"),
				ObjectMeta: metav1.ObjectMeta{Name: LeaseRoleName, Namespace: ing.LeaseNamespace, Labels: labels},
				RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: LeaseRoleName},
				Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: Name, Namespace: cfg.Namespace}},
			},
		},
		{
			obj: &rbacv1.Role{
				TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "Role"),
				ObjectMeta: metav1.ObjectMeta{Name: statusRole, Namespace: cfg.Namespace, Labels: labels},
				Rules: []rbacv1.PolicyRule{
					{APIGroups: []string{coordinationv1.GroupName}, Resources: []string{"leases"}, Verbs: []string{"get", "list", "create", "update"}},
				},
			},
			header: fmt.Sprintf(`Each agent keeps a Lease %s<node> in this namespace with a summary of
its status (knit status, knit doctor read them): renewed once a minute,
rewritten sooner only when the node's own state changes, watched by nobody. Only knit's objects
live in this namespace; RBAC cannot limit an agent to its own node's Lease
(the agents share one ServiceAccount). list is for knit status and knit doctor
run inside knit's pod on a node (kubectl exec), with this ServiceAccount.`, status.LeasePrefix),
		},
		{
			obj: &rbacv1.RoleBinding{
				TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "RoleBinding"),
				ObjectMeta: metav1.ObjectMeta{Name: statusRole, Namespace: cfg.Namespace, Labels: labels},
				RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: statusRole},
				Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: Name, Namespace: cfg.Namespace}},
			},
		},
		{
			obj: &corev1.ConfigMap{
				TypeMeta:   typeMeta("v1", "ConfigMap"),
				ObjectMeta: metav1.ObjectMeta{Name: ConfigMapName, Namespace: cfg.Namespace, Labels: labels},
				Data:       settings,
			},
			header: `Network settings, passed to ` + "`knit agent`" + ` as flags of the same names. They
must match the cluster: cluster-cidr is kube-controller-manager's
--cluster-cidr, service-cidr the API server's --service-cluster-ip-range,
cluster-dns kubelet's --cluster-dns. The DaemonSet's pod template carries a
hash of this data (` + ConfigHashAnnotation + `), so re-applying a manifest
rendered with other settings rolls the agents; editing this ConfigMap by hand
needs ` + "`kubectl -n " + cfg.Namespace + " rollout restart daemonset/knit`" + `.`,
		},
		daemonSet(cfg, labels, settings),
		kubeDNSService(cfg),
		{
			obj: &networkingv1.IngressClass{
				TypeMeta: typeMeta("networking.k8s.io/v1", "IngressClass"),
				ObjectMeta: metav1.ObjectMeta{Name: Name, Labels: labels, Annotations: map[string]string{
					networkingv1.AnnotationIsDefaultIngressClass: "true",
				}},
				Spec: networkingv1.IngressClassSpec{Controller: ing.ControllerName},
			},
			header: `The class knit's ingress serves, and the cluster default: Ingresses that name
no class are served by knit too. Remove the annotation if another ingress
controller is the default.`,
		},
	}, nil
}

func clusterRole(labels map[string]string) document {
	read := []string{"list", "watch"}
	return document{
		obj: &rbacv1.ClusterRole{
			TypeMeta:   typeMeta("rbac.authorization.k8s.io/v1", "ClusterRole"),
			ObjectMeta: metav1.ObjectMeta{Name: Name, Labels: labels},
			Rules: []rbacv1.PolicyRule{
				{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch", "patch"}},
				{APIGroups: []string{""}, Resources: []string{"pods", "services"}, Verbs: read},
				{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: read},
				{APIGroups: []string{discoveryv1.GroupName}, Resources: []string{"endpointslices"}, Verbs: read},
				{APIGroups: []string{networkingv1.GroupName}, Resources: []string{"ingresses", "ingressclasses"}, Verbs: read},
				{APIGroups: []string{networkingv1.GroupName}, Resources: []string{"ingresses/status"}, Verbs: []string{"patch"}},
				{APIGroups: []string{""}, Resources: []string{"services/status"}, Verbs: []string{"patch"}},
				{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},
			},
		},
		header: `What the agent reads and writes, and nothing more (no wildcards):
- nodes: read every Node (podCIDRs, addresses, the overlay's annotations of
  peers) and patch its own Node's knit.dev/ annotations (the overlay
  publishes its VTEP there). RBAC cannot limit the patch to the agent's own
  Node or to annotations: that takes an admission check like the
  NodeRestriction plugin's, which only covers kubelets. knit itself patches
  only its own Node, and only its own annotations.
- pods, services, endpointslices, ingresses, ingressclasses: list and watch
  into the one shared informer cache.
- secrets: the ingress watches only Secrets of type kubernetes.io/tls (a field
  selector on its list and watch), but RBAC cannot restrict a grant by field
  selector: this rule lets the agent read every Secret. Drop it (and run the
  agent without the ingress) if that is not acceptable.
- ingresses/status: the Lease holder patches the node addresses into
  status.loadBalancer of the Ingresses it serves (nothing else); events: it
  reports Ingresses it cannot serve.
- services/status: the load balancer's Lease holder patches the node
  addresses into status.loadBalancer of knit's LoadBalancer Services (and
  its own condition); nothing else of a Service is written.`,
		lineComments: map[string]string{
			"- secrets": "all Secrets (see above); knit lists only type kubernetes.io/tls",
		},
	}
}

func daemonSet(cfg Config, labels, settings map[string]string) document {
	podLabels := merge(labels, map[string]string{"app.kubernetes.io/component": "agent"})
	hostPath := func(name, path string, typ corev1.HostPathType) corev1.Volume {
		v := corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path}}}
		if typ != "" {
			v.HostPath.Type = &typ
		}
		return v
	}
	hostToContainer := corev1.MountPropagationHostToContainer
	mounts := []corev1.VolumeMount{
		{Name: "run-knit", MountPath: "/run/knit"},
		{Name: "var-lib-knit", MountPath: "/var/lib/knit"},
		{Name: "cni-conf", MountPath: "/etc/cni/net.d"},
		{Name: "cni-bin", MountPath: "/opt/cni/bin"},
		{Name: "netns", MountPath: "/run/netns", MountPropagation: &hostToContainer},
		{Name: "lib-modules", MountPath: "/lib/modules", ReadOnly: true},
		{Name: "xtables-lock", MountPath: "/run/xtables.lock"},
	}

	// Flags come from the ConfigMap through environment variables; the
	// kubelet expands $(VAR) in args.
	env := []corev1.EnvVar{{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{
		FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: "spec.nodeName"}}},
		// The agent's --status-namespace: its status Lease lives beside it.
		{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{
			FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: "metadata.namespace"}}}}
	args := []string{"agent"}
	for _, key := range []string{"cluster-cidr", "service-cidr", "cluster-dns", "cluster-domain", "overlay-backend", "proxy-backend", "log-level"} {
		v := "KNIT_" + strings.ToUpper(strings.ReplaceAll(key, "-", "_"))
		env = append(env, corev1.EnvVar{Name: v, ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: ConfigMapName}, Key: key}}})
		args = append(args, "--"+key+"=$("+v+")")
	}
	args = append(args, fmt.Sprintf("--health-addr=127.0.0.1:%d", HealthPort))
	if cfg.APIServer != "" {
		host, port, _ := net.SplitHostPort(cfg.APIServer) // validated
		env = append(env,
			corev1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: host},
			corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: port})
	}

	probe := func(path string, period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Host: "127.0.0.1", Path: path, Port: intstr.FromInt32(HealthPort)}},
			PeriodSeconds: period, TimeoutSeconds: 5, FailureThreshold: failures,
		}
	}
	yes := true
	maxUnavailable := intstr.FromInt32(1)

	ds := &appsv1.DaemonSet{
		TypeMeta:   typeMeta("apps/v1", "DaemonSet"),
		ObjectMeta: metav1.ObjectMeta{Name: Name, Namespace: cfg.Namespace, Labels: labels},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: podLabels},
			UpdateStrategy: appsv1.DaemonSetUpdateStrategy{
				Type:          appsv1.RollingUpdateDaemonSetStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDaemonSet{MaxUnavailable: &maxUnavailable},
			},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: podLabels, Annotations: map[string]string{
					ConfigHashAnnotation: configHash(settings),
				}},
				Spec: corev1.PodSpec{
					ServiceAccountName: Name,
					HostNetwork:        true,
					DNSPolicy:          corev1.DNSDefault,
					PriorityClassName:  "system-node-critical",
					Tolerations:        []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
					NodeSelector:       map[string]string{corev1.LabelOSStable: "linux"},
					InitContainers: []corev1.Container{{
						Name:            "install-cni",
						Image:           cfg.Image,
						ImagePullPolicy: corev1.PullIfNotPresent,
						Command:         []string{BinaryPath, "install-cni", "--cni-bin-dir=/opt/cni/bin"},
						VolumeMounts:    []corev1.VolumeMount{{Name: "cni-bin", MountPath: "/opt/cni/bin"}},
						SecurityContext: &corev1.SecurityContext{
							Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
							AllowPrivilegeEscalation: new(false),
						},
					}},
					Containers: []corev1.Container{{
						Name:            "agent",
						Image:           cfg.Image,
						ImagePullPolicy: corev1.PullIfNotPresent,
						Command:         []string{BinaryPath},
						Args:            args,
						Env:             env,
						VolumeMounts:    mounts,
						LivenessProbe:   probe("/healthz", 10, 6),
						ReadinessProbe:  probe("/readyz", 5, 2),
						Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
							corev1.ResourceCPU:    resource.MustParse("50m"),
							corev1.ResourceMemory: resource.MustParse("64Mi"),
						}},
						SecurityContext: &corev1.SecurityContext{Privileged: &yes},
					}},
					Volumes: []corev1.Volume{
						hostPath("run-knit", "/run/knit", corev1.HostPathDirectoryOrCreate),
						hostPath("var-lib-knit", "/var/lib/knit", corev1.HostPathDirectoryOrCreate),
						hostPath("cni-conf", "/etc/cni/net.d", corev1.HostPathDirectoryOrCreate),
						hostPath("cni-bin", "/opt/cni/bin", corev1.HostPathDirectoryOrCreate),
						hostPath("netns", "/run/netns", corev1.HostPathDirectoryOrCreate),
						hostPath("lib-modules", "/lib/modules", ""),
						hostPath("xtables-lock", "/run/xtables.lock", corev1.HostPathFileOrCreate),
					},
				},
			},
		},
	}
	apiserver := `The agent reaches the API server through the "kubernetes" Service IP (the
kubelet's KUBERNETES_SERVICE_HOST). knit is the service proxy: on a cluster
without kube-proxy nothing programs that IP before the agent's first sync.
There, render with --apiserver HOST:PORT (the API server's real address),
which sets KUBERNETES_SERVICE_HOST/PORT on the agent.`
	if cfg.APIServer != "" {
		apiserver = `The agent reaches the API server at ` + cfg.APIServer + ` directly (--apiserver),
not through the "kubernetes" Service IP that knit itself programs.`
	}
	return document{
		obj: ds,
		header: `One agent per node: CNI setup, overlay, service proxy, cluster DNS, ingress.

- hostNetwork: the agent programs the node's own network namespace and serves
  DNS on the cluster DNS IP and the ingress on :80/:443 of every node (no
  container ports are declared: with hostNetwork they would become hostPorts
  and keep the agent off a node where something else holds one).
- dnsPolicy Default, not ClusterFirstWithHostNet: the agent IS the cluster
  DNS and takes its upstream resolvers from /etc/resolv.conf; pointing that
  at itself would forward every external query back to itself (CoreDNS runs
  with Default for the same reason). Default gives the kubelet's
  --resolv-conf, the node's real upstreams.
- priorityClassName system-node-critical, tolerations [operator: Exists]:
  without the agent a node has no pod network, so it runs on every node,
  tainted or not, and is the last thing evicted.
- install-cni (init container, no capabilities): copies the CNI plugin into
  /opt/cni/bin as "knit" (the image's plugin-only knit-cni, which starts
  faster per exec than the multi-call binary), atomically, before the agent
  writes the CNI config.
- privileged: the agent writes /proc/sys/net settings (ip_forward,
  send_redirects, accept_ra and bridge-nf-call for cni0), and container
  runtimes mount /proc/sys read-only in every container that is not
  privileged; no capability changes that. Apart from that it needs only
  NET_ADMIN (links, addresses, routes, neighbours, nftables, conntrack) and
  NET_BIND_SERVICE (DNS on :53, ingress on :80/:443, in the runtime's default
  set). It needs neither NET_RAW nor SYS_ADMIN today: it opens no raw or
  packet sockets and never enters a pod's network namespace (it only checks
  that one still exists under /run/netns). Once the agent can write sysctls
  through a host /proc mount, privileged can become
  capabilities: {add: [NET_ADMIN]}.
- host paths: /run/knit (node.json for the CNI plugin), /var/lib/knit (IPAM
  reservations, survive reboots), /etc/cni/net.d and /opt/cni/bin (the CNI
  config and plugin), /run/netns with HostToContainer propagation (pod
  network namespaces the runtime creates after the agent started must
  appear in the container), /lib/modules read-only (kernel modules nftables
  and VXLAN load on demand), /run/xtables.lock (shared with iptables users
  on the node).
- probes on 127.0.0.1:9940 (--health-addr; host network, so the kubelet
  reaches it on the node's loopback): /healthz answers while the process
  runs, /readyz once every component has synced and applied its first state.
- RollingUpdate, maxUnavailable 1: one node at a time. The data plane stays
  up while a node's agent restarts: knit never tears kernel state down on
  exit, and the new agent diffs against what is there instead of starting
  from scratch. The agent process stops within seconds of SIGTERM.
- ` + strings.ReplaceAll(apiserver, "\n", "\n  "),
		lineComments: map[string]string{
			"privileged: true":                  "only for writing /proc/sys/net (see above)",
			"mountPropagation: HostToContainer": "pod netns mounted later must appear here",
			"dnsPolicy: Default":                "the agent is the cluster DNS: upstreams from the node",
		},
	}
}

func kubeDNSService(cfg Config) document {
	svc := &corev1.Service{
		TypeMeta: typeMeta("v1", "Service"),
		ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: metav1.NamespaceSystem, Labels: map[string]string{
			"k8s-app":                "kube-dns",
			"kubernetes.io/name":     "knit",
			"app.kubernetes.io/name": Name,
		}},
		Spec: corev1.ServiceSpec{
			ClusterIP: cfg.ClusterDNS[0].String(),
			Ports: []corev1.ServicePort{
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromInt32(53)},
				{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(53)},
			},
		},
	}
	if len(cfg.ClusterDNS) == 2 {
		policy := corev1.IPFamilyPolicyRequireDualStack
		svc.Spec.IPFamilyPolicy = &policy
		svc.Spec.ClusterIPs = []string{cfg.ClusterDNS[0].String(), cfg.ClusterDNS[1].String()}
	}
	return document{
		obj: svc,
		header: `The cluster DNS Service. knit answers its IP on every node itself (a local
address on the node, which the proxy leaves alone), so the Service has no
selector and no endpoints: it exists to reserve the IP in the service CIDR
and so that kubelet's --cluster-dns and tools that look for kube-dns find
it. If CoreDNS's kube-dns Service exists already with this IP, applying this
keeps the IP and labels it for knit; remove the CoreDNS Deployment.`,
	}
}

// configHash is a short, stable hash of the settings.
func configHash(settings map[string]string) string {
	b, _ := json.Marshal(settings) // map keys are sorted
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// marshal renders obj as YAML without status, null fields and empty objects
// (creationTimestamp: null, resources: {}), which only add noise.
func marshal(obj runtime.Object) ([]byte, error) {
	j, err := json.Marshal(obj)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(j, &m); err != nil {
		return nil, err
	}
	delete(m, "status")
	prune(m)
	return yaml.Marshal(m)
}

// prune removes null values and empty objects, recursively.
func prune(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case map[string]any:
		for k, e := range x {
			if prune(e) {
				delete(x, k)
			}
		}
		return len(x) == 0
	case []any:
		for _, e := range x {
			prune(e)
		}
	}
	return false
}

// annotate appends "# comment" to the YAML lines that, trimmed, equal a key
// of comments. Each key must match exactly one line, so a comment cannot
// silently lose its line when the object changes.
func annotate(y []byte, comments map[string]string) ([]byte, error) {
	if len(comments) == 0 {
		return y, nil
	}
	lines := strings.Split(string(y), "\n")
	seen := map[string]int{}
	for i, l := range lines {
		if c, ok := comments[strings.TrimSpace(l)]; ok {
			seen[strings.TrimSpace(l)]++
			lines[i] = l + " # " + c
		}
	}
	for k := range comments {
		if seen[k] != 1 {
			return nil, fmt.Errorf("line comment for %q matched %d lines, want 1", k, seen[k])
		}
	}
	return []byte(strings.Join(lines, "\n")), nil
}

// comment turns text into YAML comment lines.
func comment(text string) string {
	if text == "" {
		return ""
	}
	var b strings.Builder
	for _, l := range strings.Split(text, "\n") {
		if l == "" {
			b.WriteString("#\n")
			continue
		}
		b.WriteString("# " + l + "\n")
	}
	return b.String()
}

func typeMeta(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}

func merge(a, b map[string]string) map[string]string {
	out := make(map[string]string, len(a)+len(b))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}
