package ingress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/restartguard"
	"knit.dev/knit/status"
)

// Controller is the ingress component.
type Controller struct {
	cfg Config
	src Sources
	log *slog.Logger
	m   *metrics
	srv *server
	b   *builder

	kick   chan struct{}
	synced []cache.InformerSynced

	refsMu sync.Mutex
	refs   refSet

	status *statusWriter
	// newNFT opens the restart guard's table (Config.RestartGuard).
	newNFT func() (knftables.Interface, error)
	ready  atomic.Bool
	// last is the newest build, for the status writer and tests.
	last atomic.Pointer[buildResult]
	// syncRec is the outcome of each build, for Status.
	syncRec status.SyncRecorder
}

const sliceIndex = "knit-ingress-by-service"

// New builds the ingress and registers its event handlers; it binds no
// port until Run.
func New(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger) (*Controller, error) {
	if src.Ingresses == nil || src.IngressClasses == nil || src.Services == nil || src.EndpointSlices == nil || src.Secrets == nil {
		return nil, errors.New("ingress: every informer in Sources is required")
	}
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("ingress: %w", err)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("ingress: metrics: %w", err)
	}
	srv, err := newServer(&cfg, m, log)
	if err != nil {
		return nil, fmt.Errorf("ingress: %w", err)
	}
	c := &Controller{
		cfg:  cfg,
		src:  src,
		log:  log,
		m:    m,
		srv:  srv,
		kick: make(chan struct{}, 1),
		newNFT: func() (knftables.Interface, error) {
			return knftables.New(knftables.InetFamily, guardTable)
		},
	}
	c.b = &builder{cfg: &c.cfg, ups: srv.ups, certs: newCertCache(), m: m}

	// EndpointSlices are looked up by Service; index them so a build does
	// not scan every slice of a namespace per backend.
	if err := src.EndpointSlices.Informer().AddIndexers(cache.Indexers{sliceIndex: sliceByService}); err != nil {
		return nil, fmt.Errorf("ingress: index EndpointSlices: %w", err)
	}
	always := func(any) bool { return true }
	handlers := []struct {
		inf      cache.SharedIndexInformer
		relevant func(any) bool
	}{
		{src.Ingresses.Informer(), always},
		{src.IngressClasses.Informer(), always},
		{src.Services.Informer(), c.serviceRelevant},
		{src.EndpointSlices.Informer(), c.sliceRelevant},
		{src.Secrets, c.secretRelevant},
	}
	for _, h := range handlers {
		reg, err := h.inf.AddEventHandler(c.handler(h.relevant))
		if err != nil {
			return nil, fmt.Errorf("ingress: event handler: %w", err)
		}
		c.synced = append(c.synced, reg.HasSynced)
	}
	if src.Client != nil {
		c.status = newStatusWriter(c)
		if src.Nodes != nil && cfg.StatusFromService == "" {
			// Node addresses only change what status says: no rebuild.
			reg, err := src.Nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
				AddFunc:    func(any) { c.status.trigger() },
				UpdateFunc: func(old, cur any) { c.status.trigger() },
				DeleteFunc: func(any) { c.status.trigger() },
			})
			if err != nil {
				return nil, fmt.Errorf("ingress: event handler: %w", err)
			}
			c.synced = append(c.synced, reg.HasSynced)
		}
	}
	return c, nil
}

// Name is the component name.
func (c *Controller) Name() string { return "ingress" }

// Ready is true once the caches synced, the first table is served and the
// listeners are bound.
func (c *Controller) Ready() bool { return c.ready.Load() }

// HTTPAddr and HTTPSAddr are the bound listen addresses (useful with port
// 0), nil before Run bound them or when disabled.
func (c *Controller) HTTPAddr() net.Addr {
	if ln := c.srv.httpLn; ln != nil {
		return ln.Addr()
	}
	return nil
}

// HTTPSAddr is the bound HTTPS address; see HTTPAddr.
func (c *Controller) HTTPSAddr() net.Addr {
	if ln := c.srv.httpsLn; ln != nil {
		return ln.Addr()
	}
	return nil
}

// Run binds the listeners, waits for the caches, serves the first table,
// then follows every change until ctx ends. In-flight requests get
// ShutdownGrace to finish.
func (c *Controller) Run(ctx context.Context) error {
	if err := c.srv.listen(c.cfg.HTTPAddr, c.cfg.HTTPSAddr); err != nil {
		return fmt.Errorf("ingress: listen: %w", err)
	}
	c.log.Info("ingress listening", "http", addrString(c.HTTPAddr()), "https", addrString(c.HTTPSAddr()))
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		c.srv.closeListeners()
		return nil // ctx ended first
	}
	c.sync()
	c.srv.serve(ctx)
	g := c.openGuard(ctx)
	c.ready.Store(true)

	var wg, guardWG sync.WaitGroup
	if c.status != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.status.run(ctx)
		}()
	}
	if g != nil {
		guardWG.Add(1)
		go func() {
			defer guardWG.Done()
			c.refreshGuard(ctx, g)
		}()
	}
	c.syncLoop(ctx)
	c.ready.Store(false)
	guardWG.Wait()
	c.drainGuard(g)
	c.srv.shutdown(c.cfg.ShutdownGrace)
	wg.Wait()
	c.log.Info("ingress stopped")
	return nil
}

// openGuard installs the restart guard for the bound listeners and lets
// new connections through again if a previous ingress drained them. The
// guard is best effort: without it the ingress serves as well, and only a
// restart refuses connections.
func (c *Controller) openGuard(ctx context.Context) *restartguard.Guard {
	if !c.cfg.RestartGuard {
		return nil
	}
	nft, err := c.newNFT()
	if err == nil {
		g := restartguard.New(nft, guardSpec, c.log, guardAddrs(c.HTTPAddr(), c.HTTPSAddr()))
		if err = g.Install(ctx); err == nil {
			c.log.Info("ingress restart guard installed", "guard", g.String())
			return g
		}
	}
	c.m.guardErrors.WithLabelValues("install").Inc()
	c.log.Warn("ingress restart guard not installed: new connections are refused while the agent restarts", "err", err)
	return nil
}

// refreshGuard keeps the guard's ports from timing out while serving.
func (c *Controller) refreshGuard(ctx context.Context, g *restartguard.Guard) {
	g.Keep(ctx, func(err error) {
		c.m.guardErrors.WithLabelValues("refresh").Inc()
		c.log.Warn("ingress restart guard refresh failed", "err", err)
	})
}

// drainGuard makes new connections wait for the next ingress, then keeps
// accepting for drainAccept so that handshakes under way are served rather
// than reset when the listeners close.
func (c *Controller) drainGuard(g *restartguard.Guard) {
	if g == nil || g.Empty() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := g.Drain(ctx); err != nil {
		c.m.guardErrors.WithLabelValues("drain").Inc()
		c.log.Warn("ingress restart guard: draining failed; connections arriving during the restart are refused", "err", err)
		return
	}
	time.Sleep(drainAccept)
}

func addrString(a net.Addr) string {
	if a == nil {
		return "off"
	}
	return a.String()
}

// handler records that something relevant changed and wakes the sync
// loop; it does no work itself.
func (c *Controller) handler(relevant func(any) bool) cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if relevant(obj) {
				c.trigger()
			}
		},
		UpdateFunc: func(old, cur any) {
			if sameVersion(old, cur) {
				return // a resync, not a change
			}
			if relevant(old) || relevant(cur) {
				c.trigger()
			}
		},
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if relevant(obj) {
				c.trigger()
			}
		},
	}
}

func sameVersion(a, b any) bool {
	ma, err1 := meta.Accessor(a)
	mb, err2 := meta.Accessor(b)
	return err1 == nil && err2 == nil && ma.GetResourceVersion() != "" && ma.GetResourceVersion() == mb.GetResourceVersion()
}

func (c *Controller) trigger() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *Controller) referenced(kind func(refSet) map[string]struct{}, key string) bool {
	c.refsMu.Lock()
	defer c.refsMu.Unlock()
	m := kind(c.refs)
	if m == nil {
		return true // before the first build everything matters
	}
	_, ok := m[key]
	return ok
}

func (c *Controller) serviceRelevant(obj any) bool {
	s, ok := obj.(*corev1.Service)
	return !ok || c.referenced(func(r refSet) map[string]struct{} { return r.services }, s.Namespace+"/"+s.Name)
}

func (c *Controller) sliceRelevant(obj any) bool {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return true
	}
	svc := s.Labels[discoveryv1.LabelServiceName]
	return svc != "" && c.referenced(func(r refSet) map[string]struct{} { return r.services }, s.Namespace+"/"+svc)
}

func (c *Controller) secretRelevant(obj any) bool {
	s, ok := obj.(*corev1.Secret)
	return !ok || c.referenced(func(r refSet) map[string]struct{} { return r.secrets }, s.Namespace+"/"+s.Name)
}

func sliceByService(obj any) ([]string, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	svc := s.Labels[discoveryv1.LabelServiceName]
	if svc == "" {
		return nil, nil
	}
	return []string{s.Namespace + "/" + svc}, nil
}

// syncLoop rebuilds after changes, at most once per MinSyncInterval, and
// at least once per ResyncInterval.
func (c *Controller) syncLoop(ctx context.Context) {
	resync := time.NewTimer(c.cfg.ResyncInterval)
	defer resync.Stop()
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
		case <-resync.C:
		}
		if wait := c.cfg.MinSyncInterval - time.Since(last); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		// Changes that arrived while waiting are in this build.
		select {
		case <-c.kick:
		default:
		}
		last = time.Now()
		c.sync()
		resync.Reset(c.cfg.ResyncInterval)
	}
}

// sync renders the whole routing table from the cache and swaps it in.
func (c *Controller) sync() {
	start := time.Now()
	in := c.snapshot()
	res := c.b.build(in)
	c.srv.swap(res.table)
	c.srv.ups.prune(c.b.gen)
	c.refsMu.Lock()
	c.refs = res.refs
	c.refsMu.Unlock()
	prev := c.last.Swap(res)
	c.syncRec.Record(nil)
	c.m.rebuild.Observe(time.Since(start).Seconds())

	counts := map[string]int{}
	for _, p := range res.problems {
		counts[p.reason]++
	}
	c.m.problems.Reset()
	for r, n := range counts {
		c.m.problems.WithLabelValues(r).Set(float64(n))
	}
	if prev == nil || !sameProblems(prev.problems, res.problems) {
		for _, p := range res.problems {
			c.log.Warn("ingress problem", "ingress", p.ingress.String(), "reason", p.reason, "msg", p.message)
		}
	}
	c.log.Debug("routing table swapped", "ingresses", len(res.served), "routes", res.table.routes,
		"problems", len(res.problems), "took", time.Since(start))
	if c.status != nil {
		c.status.trigger()
	}
}

func sameProblems(a, b []problem) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// snapshot reads the cache for a build.
func (c *Controller) snapshot() *buildInput {
	ings, _ := c.src.Ingresses.Lister().List(labels.Everything())
	classes, _ := c.src.IngressClasses.Lister().List(labels.Everything())
	sort.Slice(classes, func(i, j int) bool { return classes[i].Name < classes[j].Name })
	svcs := c.src.Services.Lister()
	sliceIdx := c.src.EndpointSlices.Informer().GetIndexer()
	secrets := c.src.Secrets.GetIndexer()
	return &buildInput{
		ingresses: ings,
		classes:   classes,
		service: func(ns, name string) *corev1.Service {
			s, err := svcs.Services(ns).Get(name)
			if err != nil {
				return nil
			}
			return s
		},
		slices: func(ns, svc string) []*discoveryv1.EndpointSlice {
			objs, err := sliceIdx.ByIndex(sliceIndex, ns+"/"+svc)
			if err != nil {
				return nil
			}
			out := make([]*discoveryv1.EndpointSlice, 0, len(objs))
			for _, o := range objs {
				if s, ok := o.(*discoveryv1.EndpointSlice); ok {
					out = append(out, s)
				}
			}
			sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
			return out
		},
		secret: func(ns, name string) *corev1.Secret {
			o, ok, err := secrets.GetByKey(ns + "/" + name)
			if err != nil || !ok {
				return nil
			}
			s, _ := o.(*corev1.Secret)
			return s
		},
	}
}
