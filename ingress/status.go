package ingress

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"

	"knit.dev/knit/cluster"
)

// statusWriter is the one writer (per cluster) of Ingress status and
// Events. Every node's ingress serves traffic, but only the holder of a
// coordination.k8s.io Lease writes, so 5,000 nodes do not race to write
// the same status or repeat the same Event.
type statusWriter struct {
	c    *Controller
	kick chan struct{}
	// leading is held by the one lead loop running: client-go starts
	// OnStartedLeading in a goroutine of its own, so a term that ends and a
	// new one that starts at once could otherwise overlap for a moment.
	leading sync.Mutex
	// reported are the problems already sent as Events this term, so a
	// problem is reported once, and again only after it was fixed.
	reported map[problem]bool
}

func newStatusWriter(c *Controller) *statusWriter {
	return &statusWriter{c: c, kick: make(chan struct{}, 1)}
}

func (w *statusWriter) trigger() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// run campaigns for the Lease until ctx ends; while leading it writes.
func (w *statusWriter) run(ctx context.Context) {
	c := w.c
	id := c.cfg.NodeName
	if id == "" {
		id, _ = os.Hostname()
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: c.cfg.LeaseNamespace, Name: c.cfg.LeaseName},
		Client:     c.src.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: id},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   15 * time.Second,
			RenewDeadline:   10 * time.Second,
			RetryPeriod:     2 * time.Second,
			ReleaseOnCancel: true,
			Name:            "knit-ingress-status",
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: w.lead,
				OnStoppedLeading: func() {},
			},
		})
		if err != nil {
			c.log.Error("ingress status: leader election", "err", err)
			return
		}
		le.Run(ctx)
	}
}

// lead writes status and Events until leadership (ctx) ends.
func (w *statusWriter) lead(ctx context.Context) {
	w.leading.Lock()
	defer w.leading.Unlock()
	if ctx.Err() != nil {
		return // the term ended while the previous one was finishing
	}
	c := w.c
	c.log.Info("ingress status: now the writer", "lease", c.cfg.LeaseNamespace+"/"+c.cfg.LeaseName)
	bc := record.NewBroadcaster(record.WithContext(ctx))
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.src.Client.CoreV1().Events("")})
	defer bc.Shutdown()
	rec := bc.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "knit-ingress", Host: c.cfg.NodeName})
	w.reported = map[problem]bool{}
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	for {
		if res := c.last.Load(); res != nil {
			w.writeEvents(res, rec)
			if !w.writeStatus(ctx, res) {
				// Try again soon rather than at the next tick.
				time.AfterFunc(2*time.Second, w.trigger)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		case <-tick.C:
		}
	}
}

func (w *statusWriter) writeEvents(res *buildResult, rec record.EventRecorder) {
	c := w.c
	now := map[problem]bool{}
	for _, p := range res.problems {
		now[p] = true
		if w.reported[p] || p.ingress.Name == "" {
			continue
		}
		ing, err := c.src.Ingresses.Lister().Ingresses(p.ingress.Namespace).Get(p.ingress.Name)
		if err != nil {
			continue
		}
		rec.Event(ing, corev1.EventTypeWarning, p.reason, p.message)
	}
	w.reported = now
}

// addresses is what status.loadBalancer.ingress should say.
func (w *statusWriter) addresses() []networkingv1.IngressLoadBalancerIngress {
	c := w.c
	var out []networkingv1.IngressLoadBalancerIngress
	if ref := c.cfg.StatusFromService; ref != "" {
		ns, name, _ := strings.Cut(ref, "/")
		svc, err := c.src.Services.Lister().Services(ns).Get(name)
		if err != nil {
			return nil
		}
		for _, lb := range svc.Status.LoadBalancer.Ingress {
			out = append(out, networkingv1.IngressLoadBalancerIngress{IP: lb.IP, Hostname: lb.Hostname})
		}
		if len(out) == 0 {
			for _, ip := range svc.Spec.ExternalIPs {
				out = append(out, networkingv1.IngressLoadBalancerIngress{IP: ip})
			}
		}
	} else {
		out = w.nodeAddresses()
	}
	slices.SortFunc(out, func(a, b networkingv1.IngressLoadBalancerIngress) int {
		if a.IP != b.IP {
			return strings.Compare(a.IP, b.IP)
		}
		return strings.Compare(a.Hostname, b.Hostname)
	})
	return out
}

// nodeAddresses are the addresses of every Ready node (each serves the
// ingress on its host network): a node's ExternalIPs when it has any, else
// its InternalIPs. Without a Nodes informer, or before any node is Ready,
// they are this node's own addresses.
func (w *statusWriter) nodeAddresses() []networkingv1.IngressLoadBalancerIngress {
	c := w.c
	var out []networkingv1.IngressLoadBalancerIngress
	if c.src.Nodes != nil {
		nodes, _ := c.src.Nodes.Lister().List(labels.Everything())
		for _, n := range nodes {
			if n.DeletionTimestamp != nil || !cluster.NodeReady(n) {
				continue
			}
			for _, typ := range []corev1.NodeAddressType{corev1.NodeExternalIP, corev1.NodeInternalIP} {
				found := false
				for _, a := range n.Status.Addresses {
					if a.Type == typ && a.Address != "" {
						out = append(out, networkingv1.IngressLoadBalancerIngress{IP: a.Address})
						found = true
					}
				}
				if found {
					break
				}
			}
		}
	}
	if len(out) == 0 {
		for _, ip := range c.cfg.NodeIPs {
			out = append(out, networkingv1.IngressLoadBalancerIngress{IP: ip.String()})
		}
	}
	return out
}

// writeStatus updates the Ingresses whose status differs, and clears the
// status of Ingresses knit no longer serves (they left its class) when it
// is the one knit wrote; it reports whether every write succeeded.
func (w *statusWriter) writeStatus(ctx context.Context, res *buildResult) bool {
	c := w.c
	want := w.addresses()
	ok := true
	served := map[types.NamespacedName]bool{}
	for _, ing := range res.served {
		served[types.NamespacedName{Namespace: ing.Namespace, Name: ing.Name}] = true
		if !w.setStatus(ctx, ing.Namespace, ing.Name, want) {
			ok = false
		}
	}
	all, _ := c.src.Ingresses.Lister().List(labels.Everything())
	for _, ing := range all {
		lb := ing.Status.LoadBalancer.Ingress
		if served[types.NamespacedName{Namespace: ing.Namespace, Name: ing.Name}] || len(lb) == 0 || !sameLBIngress(lb, want) {
			continue
		}
		// Ours by its contents: another controller's status names its own
		// addresses. Cleared so that a client does not keep sending to knit.
		if !w.setStatus(ctx, ing.Namespace, ing.Name, nil) {
			ok = false
		}
	}
	return ok
}

// setStatus makes an Ingress's status.loadBalancer.ingress want; it
// reports whether that worked (or nothing was to be done). It sends a JSON
// merge patch of that one field to the status subresource, guarded by the
// cached resourceVersion, never the cached object: the cache holds slimmed
// objects (no last-applied annotation, no managedFields), and the API
// server keeps the metadata of a status update, so writing one back would
// erase what `kubectl apply` needs.
func (w *statusWriter) setStatus(ctx context.Context, namespace, name string, want []networkingv1.IngressLoadBalancerIngress) bool {
	c := w.c
	ing, err := c.src.Ingresses.Lister().Ingresses(namespace).Get(name)
	if err != nil || ing.DeletionTimestamp != nil || sameLBIngress(ing.Status.LoadBalancer.Ingress, want) {
		return true
	}
	var body struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
		Status struct {
			LoadBalancer struct {
				Ingress []networkingv1.IngressLoadBalancerIngress `json:"ingress"` // null clears
			} `json:"loadBalancer"`
		} `json:"status"`
	}
	body.Metadata.ResourceVersion = ing.ResourceVersion
	body.Status.LoadBalancer.Ingress = want
	data, err := json.Marshal(body)
	if err != nil {
		c.log.Error("ingress status: encode patch", "err", err)
		return false
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = c.src.Client.NetworkingV1().Ingresses(namespace).Patch(cctx, name, types.MergePatchType, data, metav1.PatchOptions{}, "status")
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			c.log.Warn("ingress status: update failed", "ingress", namespace+"/"+name, "err", err)
		}
		return false
	}
	c.m.statusWrites.Inc()
	return true
}

func sameLBIngress(a, b []networkingv1.IngressLoadBalancerIngress) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].IP != b[i].IP || a[i].Hostname != b[i].Hostname || len(a[i].Ports) != 0 {
			return false
		}
	}
	return true
}
