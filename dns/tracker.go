package dns

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/labels"
	toolscache "k8s.io/client-go/tools/cache"
)

// tracker is the "track" step: event handlers only note which Services and
// Pods changed; the sync goroutine rebuilds their records.
type tracker struct {
	log     *slog.Logger
	src     Sources
	slices  toolscache.Indexer
	mu      sync.Mutex
	svcs    map[string]struct{} // "ns/name"
	pods    map[string]struct{} // "ns/name"
	kick    chan struct{}
	handles []toolscache.ResourceEventHandlerRegistration
}

// sliceIndex indexes EndpointSlices by the Service they belong to.
const sliceIndex = "knit-dns/service"

// minSyncInterval batches bursts of events into one publish.
const minSyncInterval = 20 * time.Millisecond

func newTracker(src Sources, log *slog.Logger) (*tracker, error) {
	t := &tracker{
		log:  log,
		src:  src,
		svcs: map[string]struct{}{},
		pods: map[string]struct{}{},
		kick: make(chan struct{}, 1),
	}
	sinf := src.EndpointSlices.Informer()
	if _, ok := sinf.GetIndexer().GetIndexers()[sliceIndex]; !ok {
		if err := sinf.AddIndexers(toolscache.Indexers{sliceIndex: sliceServiceKey}); err != nil {
			return nil, fmt.Errorf("EndpointSlice index: %w", err)
		}
	}
	t.slices = sinf.GetIndexer()

	h, err := src.Services.Informer().AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { t.markObj(t.svcs, obj) },
		UpdateFunc: func(old, cur any) {
			o, ok1 := old.(*corev1.Service)
			c, ok2 := cur.(*corev1.Service)
			if ok1 && ok2 && serviceDNSEqual(o, c) {
				return
			}
			t.markObj(t.svcs, cur)
		},
		DeleteFunc: func(obj any) { t.markObj(t.svcs, obj) },
	})
	if err != nil {
		return nil, err
	}
	t.handles = append(t.handles, h)
	h, err = sinf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { t.markSlice(obj) },
		UpdateFunc: func(old, cur any) {
			t.markSlice(old) // the Service label may have changed
			t.markSlice(cur)
		},
		DeleteFunc: func(obj any) { t.markSlice(obj) },
	})
	if err != nil {
		return nil, err
	}
	t.handles = append(t.handles, h)
	if src.Pods != nil {
		h, err = src.Pods.Informer().AddEventHandler(toolscache.ResourceEventHandlerFuncs{
			AddFunc: func(obj any) { t.markObj(t.pods, obj) },
			UpdateFunc: func(old, cur any) {
				o, ok1 := old.(*corev1.Pod)
				c, ok2 := cur.(*corev1.Pod)
				if ok1 && ok2 && podDNSEqual(o, c) {
					return // most Pod updates are status noise
				}
				t.markObj(t.pods, cur)
			},
			DeleteFunc: func(obj any) { t.markObj(t.pods, obj) },
		})
		if err != nil {
			return nil, err
		}
		t.handles = append(t.handles, h)
	}
	return t, nil
}

func sliceServiceKey(obj any) ([]string, error) {
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	name := sl.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{sl.Namespace + "/" + name}, nil
}

func (t *tracker) markObj(set map[string]struct{}, obj any) {
	key, err := toolscache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	t.mu.Lock()
	set[key] = struct{}{}
	t.mu.Unlock()
	t.poke()
}

func (t *tracker) markSlice(obj any) {
	if d, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	keys, _ := sliceServiceKey(obj)
	if len(keys) == 0 {
		return
	}
	t.mu.Lock()
	t.svcs[keys[0]] = struct{}{}
	t.mu.Unlock()
	t.poke()
}

func (t *tracker) poke() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// take returns and clears the changed keys.
func (t *tracker) take() (svcs, pods []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k := range t.svcs {
		svcs = append(svcs, k)
	}
	for k := range t.pods {
		pods = append(pods, k)
	}
	clear(t.svcs)
	clear(t.pods)
	return svcs, pods
}

func (t *tracker) hasSynced() bool {
	for _, h := range t.handles {
		if !h.HasSynced() {
			return false
		}
	}
	return true
}

// serviceDNSEqual reports whether two versions of a Service give the same
// records.
func serviceDNSEqual(a, b *corev1.Service) bool {
	return a.Spec.Type == b.Spec.Type &&
		a.Spec.ClusterIP == b.Spec.ClusterIP &&
		equality.Semantic.DeepEqual(a.Spec.ClusterIPs, b.Spec.ClusterIPs) &&
		a.Spec.ExternalName == b.Spec.ExternalName &&
		a.Spec.PublishNotReadyAddresses == b.Spec.PublishNotReadyAddresses &&
		equality.Semantic.DeepEqual(a.Spec.Ports, b.Spec.Ports)
}

func podDNSEqual(a, b *corev1.Pod) bool {
	if a.Status.Phase != b.Status.Phase || a.Status.PodIP != b.Status.PodIP || len(a.Status.PodIPs) != len(b.Status.PodIPs) {
		return false
	}
	for i := range a.Status.PodIPs {
		if a.Status.PodIPs[i].IP != b.Status.PodIPs[i].IP {
			return false
		}
	}
	return true
}

// runSync is the "render" step: one goroutine, which waits for the informers,
// publishes every record once (then Ready), and from then on rebuilds what
// the handlers marked, at most every minSyncInterval, plus everything every
// ResyncPeriod.
func (s *Server) runSync(ctx context.Context) {
	synced := []toolscache.InformerSynced{s.src.Services.Informer().HasSynced, s.src.EndpointSlices.Informer().HasSynced, s.tracker.hasSynced}
	if s.src.Pods != nil {
		synced = append(synced, s.src.Pods.Informer().HasSynced)
	}
	if !toolscache.WaitForCacheSync(ctx.Done(), synced...) {
		return
	}
	s.fullSync()
	if !s.synced.Swap(true) {
		s.log.Info("dns ready: cluster records published", "names", s.idx.len())
	}
	resync := time.NewTicker(s.cfg.ResyncPeriod)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.tracker.kick:
			s.syncChanged()
		case <-resync.C:
			s.fullSync()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(minSyncInterval):
		}
	}
}

// fullSync rebuilds every owner from the listers. Owners whose records did
// not change cost a comparison, not a repack.
func (s *Server) fullSync() {
	start := time.Now()
	s.tracker.take() // everything is rebuilt below
	svcs, err := s.src.Services.Lister().List(labels.Everything())
	if err != nil {
		s.log.Error("list services", "err", err)
		s.syncRec.Record(err)
		return
	}
	want := make(map[string]bool, len(svcs))
	for _, svc := range svcs {
		key := svc.Namespace + "/" + svc.Name
		owner := "svc/" + key
		want[owner] = true
		s.idx.set(owner, s.records.service(svc, s.slicesOf(key)))
	}
	if s.src.Pods != nil {
		pods, err := s.src.Pods.Lister().List(labels.Everything())
		if err != nil {
			s.log.Error("list pods", "err", err)
			s.syncRec.Record(err)
			return
		}
		for _, p := range pods {
			owner := "pod/" + p.Namespace + "/" + p.Name
			want[owner] = true
			s.idx.set(owner, s.records.pod(p))
		}
	}
	var gone []string
	for owner := range s.idx.contrib {
		if owner != "static" && !want[owner] {
			gone = append(gone, owner)
		}
	}
	sort.Strings(gone)
	for _, owner := range gone {
		s.idx.set(owner, nil)
	}
	n := s.idx.commit()
	s.syncRec.Record(nil)
	s.m.syncs.Inc()
	s.m.syncDuration.Observe(time.Since(start).Seconds())
	s.log.Debug("dns full sync", "services", len(svcs), "published", n, "took", time.Since(start))
}

// syncChanged rebuilds the owners the handlers marked.
func (s *Server) syncChanged() {
	start := time.Now()
	svcs, pods := s.tracker.take()
	for _, key := range svcs {
		ns, name, err := toolscache.SplitMetaNamespaceKey(key)
		if err != nil {
			continue
		}
		svc, err := s.src.Services.Lister().Services(ns).Get(name)
		if err != nil {
			s.idx.set("svc/"+key, nil)
			continue
		}
		s.idx.set("svc/"+key, s.records.service(svc, s.slicesOf(key)))
	}
	if s.src.Pods != nil {
		for _, key := range pods {
			ns, name, err := toolscache.SplitMetaNamespaceKey(key)
			if err != nil {
				continue
			}
			p, err := s.src.Pods.Lister().Pods(ns).Get(name)
			if err != nil {
				s.idx.set("pod/"+key, nil)
				continue
			}
			s.idx.set("pod/"+key, s.records.pod(p))
		}
	}
	n := s.idx.commit()
	s.syncRec.Record(nil)
	s.m.syncs.Inc()
	s.m.syncDuration.Observe(time.Since(start).Seconds())
	if n > 0 {
		s.log.Debug("dns sync", "services", len(svcs), "pods", len(pods), "published", n, "took", time.Since(start))
	}
}

func (s *Server) slicesOf(key string) []*discoveryv1.EndpointSlice {
	objs, err := s.tracker.slices.ByIndex(sliceIndex, key)
	if err != nil {
		return nil
	}
	out := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if sl, ok := o.(*discoveryv1.EndpointSlice); ok {
			out = append(out, sl)
		}
	}
	// Stable order, so that an unchanged Service rebuilds equal.
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
