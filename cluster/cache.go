// Package cluster owns the agent's ONE view of the cluster: a single client-go
// shared informer factory whose objects are slimmed on the way in, and the
// API-server connection that feeds it.
//
// Data flow:
//
//	kube-apiserver --(list/watch, gated by apiHealth; connections closed
//	    when their local address goes away: localaddr.go)--> reflectors
//	    --(transform: drop managedFields, big annotations, unused Pod and
//	       EndpointSlice fields)-->
//	    one indexer per resource --> narrow informers handed to each component
//
// Components never get the factory itself: the agent passes each one only the
// typed informers it reads (see agent.wire). Informers are created lazily, so
// a resource no enabled component asked for is never listed or watched.
//
// Secrets are the exception to "one informer per type as the factory builds
// it": only kubernetes.io/tls Secrets are watched (a field selector), because
// the ingress is the only reader and other Secrets are both large and none of
// knit's business.
package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	netinformers "k8s.io/client-go/informers/networking/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Cache is the shared informer cache. Create it with New, take the informers
// the enabled components need, then Start it once.
type Cache struct {
	client  kubernetes.Interface
	factory informers.SharedInformerFactory
	log     *slog.Logger
}

// New builds the shared cache on client. resync is the informers' resync
// period (0 disables it; components run their own full-resync timers).
func New(client kubernetes.Interface, resync time.Duration, log *slog.Logger) *Cache {
	return &Cache{
		client:  client,
		factory: informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(Slim)),
		log:     log,
	}
}

// Client is the API client the cache reads through; components that write
// (status, events, leases, node annotations) use it too.
func (c *Cache) Client() kubernetes.Interface { return c.client }

// Services is the Service informer.
func (c *Cache) Services() coreinformers.ServiceInformer { return c.factory.Core().V1().Services() }

// EndpointSlices is the EndpointSlice informer.
func (c *Cache) EndpointSlices() discoveryinformers.EndpointSliceInformer {
	return c.factory.Discovery().V1().EndpointSlices()
}

// Nodes is the Node informer.
func (c *Cache) Nodes() coreinformers.NodeInformer { return c.factory.Core().V1().Nodes() }

// Pods is the Pod informer (slimmed: see slimPod).
func (c *Cache) Pods() coreinformers.PodInformer { return c.factory.Core().V1().Pods() }

// Ingresses is the Ingress informer.
func (c *Cache) Ingresses() netinformers.IngressInformer {
	return c.factory.Networking().V1().Ingresses()
}

// IngressClasses is the IngressClass informer.
func (c *Cache) IngressClasses() netinformers.IngressClassInformer {
	return c.factory.Networking().V1().IngressClasses()
}

// TLSSecrets is an informer over Secrets of type kubernetes.io/tls only.
func (c *Cache) TLSSecrets() cache.SharedIndexInformer {
	return c.factory.InformerFor(&corev1.Secret{}, func(client kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		tweak := func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("type", string(corev1.SecretTypeTLS)).String()
		}
		inf := coreinformers.NewFilteredSecretInformer(client, metav1.NamespaceAll, resync,
			cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}, tweak)
		if err := inf.SetTransform(Slim); err != nil {
			// Only fails after the informer started, which cannot be the case here.
			panic(fmt.Sprintf("cluster: set transform on a new informer: %v", err))
		}
		return inf
	})
}

// Start starts every informer requested so far. Informers requested later
// need another Start call (the factory starts only new ones).
func (c *Cache) Start(ctx context.Context) {
	c.factory.Start(ctx.Done())
}

// Shutdown waits for the informer goroutines to stop after ctx is done.
func (c *Cache) Shutdown() { c.factory.Shutdown() }

// WaitForSync blocks until every started informer has synced or ctx is done,
// and reports which ones have not.
func (c *Cache) WaitForSync(ctx context.Context) error {
	var missing []string
	for typ, ok := range c.factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			missing = append(missing, typ.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("informers not synced: %v", missing)
	}
	return nil
}

// lastApplied is the kubectl annotation holding a full copy of the object.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// Slim is the transform every informer applies before an object enters the
// cache: it drops what no knit component reads, so that memory stays
// proportional to what knit needs (DESIGN: 1,000 Services / 10,000 endpoints
// / 1,000 Pods in 64 MiB for the whole agent; docs/benchmarks.md, Memory).
//
// An object that a component writes back whole must keep everything the
// API server would take from the write: a write through a built-in type's
// /status stores its metadata too. Ingresses only lose managedFields
// (which an update leaves unchanged when it omits them). The ingress no
// longer writes a cached Ingress back (it sends a merge patch of
// status.loadBalancer: ingress/status.go, setStatus), so this keeps the
// last-applied annotation safe should an UpdateStatus of a cached copy
// come back, at the cost of caching that annotation.
func Slim(obj any) (any, error) {
	if ing, ok := obj.(*networkingv1.Ingress); ok {
		ing.ManagedFields = nil
		return ing, nil
	}
	// Tombstones and other non-objects pass through untouched.
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
		if a := m.GetAnnotations(); a != nil {
			if _, ok := a[lastApplied]; ok {
				delete(a, lastApplied)
			}
		}
	}
	switch o := obj.(type) {
	case *corev1.Pod:
		return slimPod(o), nil
	case *corev1.Node:
		slimNode(o)
	case *discoveryv1.EndpointSlice:
		slimEndpointSlice(o)
	}
	return obj, nil
}

// slimEndpointSlice drops the per-endpoint parts no component reads: the
// targetRef (a whole object reference per endpoint, the biggest part of a
// controller-written slice), the deprecated topology map, the owner
// reference, and every annotation but the last-change trigger time (the
// proxy's programming latency metric).
func slimEndpointSlice(s *discoveryv1.EndpointSlice) {
	s.OwnerReferences = nil
	if len(s.Annotations) > 0 {
		v, ok := s.Annotations[corev1.EndpointsLastChangeTriggerTime]
		s.Annotations = nil
		if ok {
			s.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: v}
		}
	}
	for i := range s.Endpoints {
		s.Endpoints[i].TargetRef = nil
		s.Endpoints[i].DeprecatedTopology = nil
	}
}

// slimPod keeps only what knit reads from a Pod: identity, labels (doctor's
// selector checks), node, hostname/subdomain (DNS), IPs, phase and the Ready
// condition. Container specs and statuses are most of a Pod's bytes.
func slimPod(p *corev1.Pod) *corev1.Pod {
	out := &corev1.Pod{
		TypeMeta: p.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name:              p.Name,
			Namespace:         p.Namespace,
			UID:               p.UID,
			ResourceVersion:   p.ResourceVersion,
			Labels:            p.Labels,
			DeletionTimestamp: p.DeletionTimestamp,
			CreationTimestamp: p.CreationTimestamp,
		},
		Spec: corev1.PodSpec{
			NodeName:    p.Spec.NodeName,
			Hostname:    p.Spec.Hostname,
			Subdomain:   p.Spec.Subdomain,
			HostNetwork: p.Spec.HostNetwork,
		},
		Status: corev1.PodStatus{
			Phase:  p.Status.Phase,
			PodIP:  p.Status.PodIP,
			PodIPs: p.Status.PodIPs,
			HostIP: p.Status.HostIP,
		},
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			out.Status.Conditions = []corev1.PodCondition{{Type: c.Type, Status: c.Status, Reason: c.Reason, Message: c.Message}}
		}
	}
	return out
}

// slimNode drops the parts of a Node no component reads: images (often tens
// of KB per node), volumes and daemon endpoints.
func slimNode(n *corev1.Node) {
	n.Status.Images = nil
	n.Status.VolumesInUse = nil
	n.Status.VolumesAttached = nil
	n.Status.NodeInfo = corev1.NodeSystemInfo{KubeletVersion: n.Status.NodeInfo.KubeletVersion}
}

// Compile-time check: Slim has the shape client-go expects.
var _ cache.TransformFunc = Slim
var _ runtime.Object = (*corev1.Pod)(nil)
