package lb

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Defaults.
const (
	DefaultClass          = "knit.dev/lb"
	DefaultMaxNodes       = 8
	DefaultLeaseNamespace = "kube-system"
	DefaultLeaseName      = "knit-lb"
)

// Config holds the load balancer's settings.
type Config struct {
	// Class is the spec.loadBalancerClass served (default DefaultClass).
	Class string
	// DefaultClass also serves LoadBalancer Services with no class. Leave
	// it off when another load balancer (a cloud's, MetalLB) handles those.
	DefaultClass bool
	// MaxNodes caps the nodes listed per Service; 0 lists every eligible
	// node (see the package doc for why there is a cap).
	MaxNodes int
	// ReservedPorts are node ports a Service may not take (see
	// DefaultReservedPorts); a Service asking for one gets no address.
	ReservedPorts []PortRange
	// NodeName identifies this agent in the Lease.
	NodeName string
	// LeaseNamespace and LeaseName name the Lease that elects the one
	// writer (default kube-system/knit-lb).
	LeaseNamespace, LeaseName string
	// ResyncPeriod is how often the writer re-checks every Service
	// (default 5m); MinSyncInterval the least time between two passes
	// (default 100ms).
	ResyncPeriod, MinSyncInterval time.Duration

	// Leader election timing; zero takes 15s / 10s / 2s (tests shorten it).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{Class: DefaultClass, MaxNodes: DefaultMaxNodes, ReservedPorts: DefaultReservedPorts()}
}

func (c *Config) defaults() error {
	if c.Class == "" {
		return errors.New("load balancer: class must not be empty")
	}
	if c.MaxNodes < 0 {
		return fmt.Errorf("load balancer: max nodes %d is negative (0 lists every node)", c.MaxNodes)
	}
	set := func(p *time.Duration, v time.Duration) {
		if *p <= 0 {
			*p = v
		}
	}
	set(&c.ResyncPeriod, 5*time.Minute)
	set(&c.MinSyncInterval, 100*time.Millisecond)
	set(&c.LeaseDuration, 15*time.Second)
	set(&c.RenewDeadline, 10*time.Second)
	set(&c.RetryPeriod, 2*time.Second)
	if c.LeaseNamespace == "" {
		c.LeaseNamespace = DefaultLeaseNamespace
	}
	if c.LeaseName == "" {
		c.LeaseName = DefaultLeaseName
	}
	if c.NodeName == "" {
		c.NodeName, _ = os.Hostname()
	}
	return nil
}

// Sources are the informers the load balancer reads (from the agent's
// shared cache) and the client it writes status and the Lease with.
type Sources struct {
	Services       coreinformers.ServiceInformer
	EndpointSlices discoveryinformers.EndpointSliceInformer
	Nodes          coreinformers.NodeInformer
	Client         kubernetes.Interface
}

// Controller is the load-balancer component.
type Controller struct {
	cfg    Config
	src    Sources
	log    *slog.Logger
	m      *metrics
	synced []cache.InformerSynced

	ready   atomic.Bool
	leading atomic.Bool
	kick    chan struct{}
	// leadMu is held by lead: client-go starts OnStartedLeading in a
	// goroutine, so a term that begins right after one ended must wait
	// for the old writer to stop.
	leadMu sync.Mutex
	// inFlight: the last status written per Service and the cached
	// resourceVersion it was written over. While the cache still shows
	// that version, the same status is not written again (it would only
	// conflict). Owned by the lead loop.
	inFlight map[types.NamespacedName]written
}

type written struct {
	rv     string
	status corev1.ServiceStatus
}

// New builds the controller and registers its event handlers (call it
// before the shared cache starts).
func New(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger) (*Controller, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if src.Services == nil || src.EndpointSlices == nil || src.Nodes == nil || src.Client == nil {
		return nil, errors.New("load balancer: Services, EndpointSlices, Nodes and Client are all required")
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	c := &Controller{cfg: cfg, src: src, log: log, m: m, kick: make(chan struct{}, 1)}
	handlers := []struct {
		inf cache.SharedIndexInformer
		h   cache.ResourceEventHandler
	}{
		{src.Services.Informer(), cache.ResourceEventHandlerFuncs{
			AddFunc: c.onService,
			UpdateFunc: func(old, cur any) {
				if c.relevant(old) || c.relevant(cur) {
					c.changed()
				}
			},
			// A deleted Service frees its ports for the others.
			DeleteFunc: c.onService,
		}},
		{src.EndpointSlices.Informer(), cache.ResourceEventHandlerFuncs{
			AddFunc:    c.onSlice,
			UpdateFunc: func(_, cur any) { c.onSlice(cur) },
			DeleteFunc: c.onSlice,
		}},
		{src.Nodes.Informer(), cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { c.changed() },
			UpdateFunc: func(old, cur any) {
				o, ok1 := old.(*corev1.Node)
				n, ok2 := cur.(*corev1.Node)
				if !ok1 || !ok2 || nodeView(o) != nodeView(n) {
					c.changed()
				}
			},
			DeleteFunc: func(any) { c.changed() },
		}},
	}
	for _, h := range handlers {
		r, err := h.inf.AddEventHandler(h.h)
		if err != nil {
			return nil, fmt.Errorf("load balancer: event handler: %w", err)
		}
		c.synced = append(c.synced, r.HasSynced)
	}
	return c, nil
}

// Name implements the agent's Component.
func (c *Controller) Name() string { return "lb" }

// Ready reports whether the informers have synced (every agent, whether
// or not it holds the Lease).
func (c *Controller) Ready() bool { return c.ready.Load() }

// Leading reports whether this agent holds the Lease and writes.
func (c *Controller) Leading() bool { return c.leading.Load() }

// serves reports whether svc is one of knit's load-balanced Services.
func (c *Controller) serves(svc *corev1.Service) bool {
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer {
		return false
	}
	if svc.Spec.LoadBalancerClass == nil {
		return c.cfg.DefaultClass
	}
	return *svc.Spec.LoadBalancerClass == c.cfg.Class
}

// relevant: a Service knit serves, or one whose status knit wrote.
func (c *Controller) relevant(obj any) bool {
	svc, ok := obj.(*corev1.Service)
	return ok && (c.serves(svc) || meta.FindStatusCondition(svc.Status.Conditions, ConditionType) != nil)
}

func (c *Controller) onService(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if c.relevant(obj) {
		c.changed()
	}
}

func (c *Controller) onSlice(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok || !c.leading.Load() {
		return
	}
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return
	}
	// Only Local Services read endpoints.
	svc, err := c.src.Services.Lister().Services(s.Namespace).Get(name)
	if err == nil && c.serves(svc) && svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
		c.changed()
	}
}

// changed wakes the writer. Every pass looks at all of knit's Services
// (a port on a node address is shared by all of them, so one Service's
// change can move another), so there is nothing to record but "again".
// Nothing happens unless this agent leads: a new leader starts with a
// pass.
func (c *Controller) changed() {
	if c.leading.Load() {
		c.trigger()
	}
}

func (c *Controller) trigger() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Run waits for the informers, then campaigns for the Lease until ctx
// ends; while leading it writes.
func (c *Controller) Run(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return nil // ctx ended
	}
	c.ready.Store(true)
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: c.cfg.LeaseNamespace, Name: c.cfg.LeaseName},
		Client:     c.src.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: c.cfg.NodeName},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   c.cfg.LeaseDuration,
			RenewDeadline:   c.cfg.RenewDeadline,
			RetryPeriod:     c.cfg.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            "knit-lb",
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: c.lead,
				OnStoppedLeading: func() {},
			},
		})
		if err != nil {
			return fmt.Errorf("load balancer: leader election: %w", err)
		}
		le.Run(ctx)
	}
	return nil
}

// lead writes status until leadership (ctx) ends.
func (c *Controller) lead(ctx context.Context) {
	c.leadMu.Lock()
	defer c.leadMu.Unlock()
	c.log.Info("load balancer: now the status writer", "lease", c.cfg.LeaseNamespace+"/"+c.cfg.LeaseName)
	c.leading.Store(true)
	c.m.leader.Set(1)
	defer func() {
		c.leading.Store(false)
		c.m.leader.Set(0)
		c.log.Info("load balancer: no longer the status writer")
	}()
	c.inFlight = map[types.NamespacedName]written{}
	c.trigger()
	tick := time.NewTicker(c.cfg.ResyncPeriod)
	defer tick.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
		case <-tick.C:
		}
		if wait := c.cfg.MinSyncInterval - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		last = time.Now()
		if !c.sync(ctx) && ctx.Err() == nil {
			time.AfterFunc(2*time.Second, c.trigger)
		}
	}
}

// sync is one pass: every Service knit serves gets the status choose
// gives it, and Services knit no longer serves lose what knit wrote. It
// reports whether every write succeeded.
//
// Services are taken oldest first, and a port on a node address belongs to
// one Service: the slots (address, protocol, port) that Services list now
// stay theirs (the older one's, if two list the same), and free slots go
// to the older Service first.
func (c *Controller) sync(ctx context.Context) bool {
	start := time.Now()
	svcs, err := c.src.Services.Lister().List(labels.Everything())
	if err != nil {
		return false
	}
	nodes, err := c.src.Nodes.Lister().List(labels.Everything())
	if err != nil {
		return false
	}
	var served, stale []*corev1.Service
	for _, svc := range svcs {
		switch {
		case c.serves(svc):
			served = append(served, svc)
		case meta.FindStatusCondition(svc.Status.Conditions, ConditionType) != nil:
			stale = append(stale, svc)
		}
	}
	slices.SortFunc(served, func(a, b *corev1.Service) int {
		if d := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); d != 0 {
			return d
		}
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})

	holders := map[slot]map[types.NamespacedName]bool{}
	take := func(k types.NamespacedName, svc *corev1.Service, in []corev1.LoadBalancerIngress, onlyFree bool) {
		for _, ing := range in {
			ip, err := netip.ParseAddr(ing.IP)
			if err != nil {
				continue
			}
			for _, s := range slots(svc, ip.Unmap()) {
				if holders[s] == nil {
					holders[s] = map[types.NamespacedName]bool{}
				}
				if !onlyFree || len(holders[s]) == 0 {
					holders[s][k] = true
				}
			}
		}
	}
	for _, svc := range served {
		take(keyOf(svc), svc, svc.Status.LoadBalancer.Ingress, true)
	}

	w := writer{c: c, nodes: nodes}
	cands := candidates(nodes)
	ok := true
	fail := func(svc *corev1.Service, err error) {
		ok = false
		if apierrors.IsConflict(err) {
			// The cache has not seen a newer version yet (often our own
			// last write): the retry reads the new one.
			c.log.Debug("load balancer: status conflict, retrying", "service", keyOf(svc).String())
			return
		}
		c.m.errors.Inc()
		if ctx.Err() == nil {
			c.log.Warn("load balancer: status write failed", "service", keyOf(svc).String(), "err", err)
		}
	}
	for _, svc := range served {
		k := keyOf(svc)
		held := func(ip netip.Addr) string {
			other := ""
			for _, s := range slots(svc, ip) {
				for h := range holders[s] {
					if h != k && (other == "" || h.String() < other) {
						other = h.String()
					}
				}
			}
			return other
		}
		var eps []*discoveryv1.EndpointSlice
		if svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
			sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: svc.Name})
			if eps, err = c.src.EndpointSlices.Lister().EndpointSlices(svc.Namespace).List(sel); err != nil {
				fail(svc, err)
				continue
			}
		}
		var p plan
		if why, bad := reservedPort(svc, c.cfg.ReservedPorts); bad {
			p = reservedPlan(svc, why)
		} else {
			p = choose(svc, cands, eps, c.cfg.MaxNodes, held)
		}
		// The Service's slots move from what it lists to what it gets.
		for s, hs := range holders {
			if hs[k] {
				delete(hs, k)
				if len(hs) == 0 {
					delete(holders, s)
				}
			}
		}
		take(k, svc, p.ingress, false)
		if err := w.serve(ctx, svc, p); err != nil {
			fail(svc, err)
		}
	}
	for _, svc := range stale {
		if err := w.clear(ctx, svc); err != nil {
			fail(svc, err)
		}
	}
	c.m.services.Set(float64(len(served)))
	c.m.syncDuration.Observe(time.Since(start).Seconds())
	return ok
}

func keyOf(svc *corev1.Service) types.NamespacedName {
	return types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
}

// writer writes the status of one pass.
type writer struct {
	c     *Controller
	nodes []*corev1.Node
}

// serve writes p into the Service's status if that differs.
func (w writer) serve(ctx context.Context, svc *corev1.Service, p plan) error {
	want := *svc.Status.DeepCopy()
	if !sameIngress(want.LoadBalancer.Ingress, p.ingress) {
		want.LoadBalancer.Ingress = p.ingress
	}
	meta.SetStatusCondition(&want.Conditions, p.cond)
	return w.write(ctx, svc, want)
}

// clear takes back what knit wrote into a Service it no longer serves: the
// node addresses and its condition. Addresses that are no node's (another
// load balancer's, written since) stay.
func (w writer) clear(ctx context.Context, svc *corev1.Service) error {
	nodeIPs := map[string]bool{}
	for _, n := range w.nodes {
		for _, ip := range internalIPs(n) {
			nodeIPs[ip.String()] = true
		}
	}
	want := *svc.Status.DeepCopy()
	want.LoadBalancer.Ingress = nil
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if !nodeIPs[ing.IP] {
			want.LoadBalancer.Ingress = append(want.LoadBalancer.Ingress, ing)
		}
	}
	meta.RemoveStatusCondition(&want.Conditions, ConditionType)
	return w.write(ctx, svc, want)
}

func (w writer) write(ctx context.Context, svc *corev1.Service, want corev1.ServiceStatus) error {
	k := keyOf(svc)
	if apiequality.Semantic.DeepEqual(svc.Status, want) {
		delete(w.c.inFlight, k)
		return nil
	}
	if f, ok := w.c.inFlight[k]; ok && f.rv == svc.ResourceVersion && sameStatus(f.status, want) {
		return nil // written; the cache has not caught up yet
	}
	if err := w.patch(ctx, svc, want); err != nil {
		return err
	}
	w.c.inFlight[k] = written{rv: svc.ResourceVersion, status: want}
	w.c.m.writes.Inc()
	w.c.log.Info("load balancer: status written", "service", keyOf(svc).String(), "ingress", ingressIPs(want.LoadBalancer.Ingress),
		"condition", conditionSummary(want.Conditions))
	return nil
}

// sameStatus compares two statuses apart from the conditions' transition
// times (a condition new in one pass gets the time of that pass).
func sameStatus(a, b corev1.ServiceStatus) bool {
	strip := func(s corev1.ServiceStatus) corev1.ServiceStatus {
		s = *s.DeepCopy()
		for i := range s.Conditions {
			s.Conditions[i].LastTransitionTime = metav1.Time{}
		}
		return s
	}
	return apiequality.Semantic.DeepEqual(strip(a), strip(b))
}

func conditionSummary(conds []metav1.Condition) string {
	c := meta.FindStatusCondition(conds, ConditionType)
	if c == nil {
		return "removed"
	}
	return string(c.Status) + " " + c.Reason + ": " + c.Message
}

// patch writes status.loadBalancer and status.conditions with a JSON merge
// patch on the status subresource, guarded by the cached resourceVersion.
func (w writer) patch(ctx context.Context, svc *corev1.Service, st corev1.ServiceStatus) error {
	type statusPatch struct {
		LoadBalancer struct {
			Ingress []corev1.LoadBalancerIngress `json:"ingress"`
		} `json:"loadBalancer"`
		Conditions []metav1.Condition `json:"conditions"`
	}
	var body struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
		Status statusPatch `json:"status"`
	}
	body.Metadata.ResourceVersion = svc.ResourceVersion
	body.Status.LoadBalancer.Ingress = st.LoadBalancer.Ingress
	body.Status.Conditions = st.Conditions
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = w.c.src.Client.CoreV1().Services(svc.Namespace).Patch(cctx, svc.Name, types.MergePatchType, data, metav1.PatchOptions{}, "status")
	return err
}

func ingressIPs(in []corev1.LoadBalancerIngress) []string {
	out := make([]string, 0, len(in))
	for _, i := range in {
		out = append(out, i.IP)
	}
	return out
}

type metrics struct {
	leader       prometheus.Gauge
	services     prometheus.Gauge
	writes       prometheus.Counter
	errors       prometheus.Counter
	syncDuration prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_lb_leader",
			Help: "1 while this agent holds the load balancer's Lease and writes Service status.",
		}),
		services: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knit_lb_services",
			Help: "LoadBalancer Services knit serves, as of the writer's last full pass.",
		}),
		writes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_lb_status_writes_total",
			Help: "Service status writes (status.loadBalancer and knit's condition).",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knit_lb_status_write_errors_total",
			Help: "Service status writes that failed (retried).",
		}),
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "knit_lb_sync_duration_seconds",
			Help:    "Time of one pass of the status writer.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}),
	}
	for _, col := range []prometheus.Collector{m.leader, m.services, m.writes, m.errors, m.syncDuration} {
		if err := reg.Register(col); err != nil {
			return nil, fmt.Errorf("load balancer: metrics: %w", err)
		}
	}
	return m, nil
}
