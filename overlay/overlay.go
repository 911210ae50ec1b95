package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/internal/xtables"
	"knit.dev/knit/status"
)

// Sources are the inputs the overlay reads, plus the client it writes its
// own Node's annotations with.
type Sources struct {
	Nodes  coreinformers.NodeInformer
	Client kubernetes.Interface
}

const (
	// minSyncInterval bounds how often bursts of Node events cause a sync.
	// Small enough for the "new node reachable within 1 s" target.
	minSyncInterval = 100 * time.Millisecond
	// firstRetry is the first delay after a failed sync; it doubles up to
	// SyncPeriod.
	firstRetry = 500 * time.Millisecond
	// patchTimeout bounds one annotation patch, so an unreachable API server
	// only delays the next publish attempt.
	patchTimeout = 10 * time.Second
)

// Overlay is the overlay component.
type Overlay struct {
	cfg    Config
	log    *slog.Logger
	client kubernetes.Interface
	nodes  corelisters.NodeLister
	synced cache.InformerSynced
	m      *metrics

	// Constructors of the kernel and nftables handles, called in Run (in
	// the network namespace Run is called in). Tests replace them.
	newKernel func() (kernel, error)
	newNFT    func() (knftables.Interface, error)

	trigger chan struct{}          // a Node changed; capacity 1, so events coalesce
	publish chan map[string]string // annotations to publish; capacity 1, latest wins
	ready   atomic.Bool
	mtu     atomic.Int64

	// For Status: the outcome of each sync and what the last one rendered.
	syncRec status.SyncRecorder
	snap    atomic.Pointer[status.Overlay]
	waiting atomic.Pointer[string]   // why the last sync could not render, "" if it could; written by the sync loop
	blocked atomic.Pointer[[]string] // native nftables forward drops, for Status

	// Owned by the sync loop.
	masq  masq
	fwd   *forward
	skips map[string]string // "peer/family" -> reason last reported
}

// New builds the overlay and registers its Node event handler; it touches
// neither the kernel nor the API server (Run does).
func New(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger) (*Overlay, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	if src.Nodes == nil || src.Client == nil {
		return nil, errors.New("overlay needs the Node informer and an API client")
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	o := &Overlay{
		cfg:       cfg,
		log:       log,
		client:    src.Client,
		nodes:     src.Nodes.Lister(),
		m:         m,
		newKernel: func() (kernel, error) { return newNetlinkKernel() },
		newNFT: func() (knftables.Interface, error) {
			return knftables.New(knftables.InetFamily, nftTable)
		},
		trigger: make(chan struct{}, 1),
		publish: make(chan map[string]string, 1),
		skips:   map[string]string{},
		fwd:     newForward(log),
	}
	o.waiting.Store(new(string))
	inf := src.Nodes.Informer()
	o.synced = inf.HasSynced
	_, err = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { o.kick() },
		UpdateFunc: func(old, cur any) {
			if relevantChange(old, cur) {
				o.kick()
			}
		},
		DeleteFunc: func(any) { o.kick() },
	})
	if err != nil {
		return nil, fmt.Errorf("node event handler: %w", err)
	}
	log.Info("overlay configured", "node", cfg.NodeName, "backend", cfg.Backend, "vni", cfg.VNI,
		"port", cfg.Port, "clusterCIDRs", cfg.ClusterCIDRs, "masquerade", cfg.Masquerade, "forwardRules", cfg.ForwardRules)
	return o, nil
}

// Name is the component name.
func (o *Overlay) Name() string { return "overlay" }

// Ready reports whether the Node cache synced and the first full state
// (devices, entries, routes, masquerade) was applied.
func (o *Overlay) Ready() bool { return o.ready.Load() }

// MTU is the MTU pods on this node must use: the underlay interface's MTU
// less the VXLAN overhead (50 bytes on an IPv4 underlay, 70 on IPv6), or the
// underlay MTU for the direct backend. 0 until the underlay is known.
func (o *Overlay) MTU() int { return int(o.mtu.Load()) }

// kick asks the sync loop for a sync; never blocks.
func (o *Overlay) kick() {
	select {
	case o.trigger <- struct{}{}:
	default:
	}
}

// relevantChange drops Node updates the overlay does not care about: most
// Node updates are kubelet status heartbeats, and at 5,000 nodes reacting to
// each would mean a sync per millisecond.
func relevantChange(old, cur any) bool {
	a, ok1 := old.(*corev1.Node)
	b, ok2 := cur.(*corev1.Node)
	if !ok1 || !ok2 {
		return true
	}
	if a.Spec.PodCIDR != b.Spec.PodCIDR || !slices.Equal(a.Spec.PodCIDRs, b.Spec.PodCIDRs) {
		return true
	}
	for _, k := range ownedKeys {
		if a.Annotations[k] != b.Annotations[k] {
			return true
		}
	}
	return !slices.Equal(internalIPs(a), internalIPs(b))
}

// Run syncs until ctx is done. It leaves every device, route and rule in
// place when it returns: pods keep talking while the agent restarts.
func (o *Overlay) Run(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), o.synced) {
		return nil // ctx done
	}
	k, err := o.newKernel()
	if err != nil {
		return err
	}
	defer k.Close()
	r := &reconciler{k: k, log: o.log, changed: func(object, op string) {
		o.m.kernelChanges.WithLabelValues(object, op).Inc()
	}}

	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		o.publishLoop(ctx)
	}()
	defer func() { <-pubDone }()
	if w, ok := k.(kernelWatcher); ok {
		watchDone := make(chan struct{})
		go func() {
			defer close(watchDone)
			w.watch(ctx, func(what string) {
				o.log.Debug("overlay: kernel entry deleted; syncing", "what", what)
				o.kick()
			}, o.log)
		}()
		defer func() { <-watchDone }()
	}

	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastSync, lastFull time.Time
	failures := 0
	for {
		full := false
		select {
		case <-ctx.Done():
			return nil
		case <-o.trigger:
		case <-timer.C:
			full = true
		}
		if wait := minSyncInterval - time.Since(lastSync); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
		select { // events up to now are part of this sync
		case <-o.trigger:
		default:
		}
		full = full || failures > 0 || time.Since(lastFull) >= o.cfg.SyncPeriod
		lastSync = time.Now()
		if full {
			lastFull = lastSync
		}
		err := o.sync(ctx, r, full)
		o.syncRec.Record(err)
		o.m.syncDuration.Observe(time.Since(lastSync).Seconds())
		if err != nil {
			failures++
			delay := min(firstRetry<<min(failures-1, 16), o.cfg.SyncPeriod)
			o.log.Warn("overlay sync failed; retrying", "err", err, "retryIn", delay)
			timer.Reset(delay)
			continue
		}
		if failures > 0 {
			o.log.Info("overlay sync recovered", "afterFailures", failures)
		}
		failures = 0
		timer.Reset(o.cfg.SyncPeriod)
	}
}

// sync renders the desired state from the cache and applies it: kernel
// first, then nftables, then (asynchronously) this node's annotations.
func (o *Overlay) sync(ctx context.Context, r *reconciler, full bool) error {
	loc, wait := o.localNode()
	if wait != "" {
		if wait != *o.waiting.Load() {
			o.log.Info("overlay waiting", "for", wait)
			o.waiting.Store(&wait)
		}
		return nil
	}
	if *o.waiting.Load() != "" {
		o.waiting.Store(new(string))
	}

	ips := []netip.Addr{o.cfg.NodeIP}
	if !o.cfg.NodeIP.IsValid() {
		self, _ := o.nodes.Get(o.cfg.NodeName)
		ips = internalIPs(self)
	}
	var errs []error
	under, err := r.discoverUnderlay(ips)
	if err != nil {
		o.m.errors.WithLabelValues("underlay").Inc()
		errs = append(errs, err)
	}
	if !under[v4].Addr.IsValid() && !under[v6].Addr.IsValid() {
		return errors.Join(errs...)
	}
	loc.Underlay = under

	nodes, err := o.nodes.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	rd := render(&o.cfg, loc, nodes)
	o.mtu.Store(int64(rd.PodMTU))
	o.report(rd)
	o.snap.Store(snapshot(loc, &rd, nodes))

	if err := r.apply(&rd.desired); err != nil {
		o.m.errors.WithLabelValues("kernel").Inc()
		errs = append(errs, err)
	} else {
		o.reportProgrammed(rd)
	}
	if err := o.syncMasq(ctx, full); err != nil {
		o.m.errors.WithLabelValues("nftables").Inc()
		errs = append(errs, err)
	}
	if err := o.syncForward(ctx, full); err != nil {
		o.m.errors.WithLabelValues("iptables").Inc()
		errs = append(errs, err)
	}

	select { // latest wins: replace an unsent older value
	case <-o.publish:
	default:
	}
	o.publish <- ownAnnotations(loc, rd.Devices)

	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if !o.ready.Load() {
		o.log.Info("overlay ready", "peers", rd.Peers, "programmed", len(rd.Programmed), "podMTU", rd.PodMTU)
		o.ready.Store(true)
	}
	return nil
}

func (o *Overlay) syncMasq(ctx context.Context, full bool) error {
	if o.masq.nft == nil {
		nft, err := o.newNFT()
		if err != nil {
			if !o.cfg.Masquerade {
				return nil // nothing to program, and no table of ours can exist without nft
			}
			return fmt.Errorf("nftables: %w", err)
		}
		o.masq.nft = nft
	}
	changed, err := o.masq.sync(ctx, &o.cfg, full)
	if changed {
		o.log.Info("nftables masquerade rules applied", "table", nftTable, "enabled", o.cfg.Masquerade)
	}
	return err
}

func (o *Overlay) syncForward(ctx context.Context, full bool) error {
	changed, err := o.fwd.sync(ctx, &o.cfg, full, func(op string) {
		o.m.kernelChanges.WithLabelValues("iptables-forward", op).Inc()
	})
	switch {
	case changed && o.cfg.ForwardRules:
		o.log.Info("iptables FORWARD accept rules applied", "chain", xtables.ForwardChain)
	case changed:
		o.log.Info("iptables FORWARD accept rules removed (turned off)", "chain", xtables.ForwardChain)
	}
	if full {
		var names []string
		for _, d := range o.fwd.checkNFT(ctx, o.m.forwardBlocked) {
			names = append(names, d.String())
		}
		o.blocked.Store(&names)
	}
	return err
}

// localNode reads this node's own facts from the cache, or says what it is
// waiting for.
func (o *Overlay) localNode() (localNode, string) {
	self, err := o.nodes.Get(o.cfg.NodeName)
	if apierrors.IsNotFound(err) || self == nil {
		return localNode{}, "this node's Node object " + o.cfg.NodeName
	}
	if err != nil {
		return localNode{}, err.Error()
	}
	loc := localNode{Name: o.cfg.NodeName}
	p, serr := parsePeer(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: self.Name}, Spec: self.Spec})
	if serr != nil {
		return loc, "a usable podCIDR on this node (" + serr.Error() + ")"
	}
	loc.PodCIDRs = p.PodCIDRs
	if !o.cfg.NodeIP.IsValid() && len(internalIPs(self)) == 0 {
		return loc, "an InternalIP address on this node (or set the node IP)"
	}
	return loc, ""
}

// report updates the peer metrics and logs each peer whose skip reason
// changed (once, not on every sync).
func (o *Overlay) report(rd rendered) {
	o.m.peersKnown.Set(float64(rd.Peers))
	now := make(map[string]string, len(rd.Skips))
	for _, s := range rd.Skips {
		fam, key := "all", s.Peer+"/all"
		if !s.Whole {
			fam, key = s.Family.String(), s.Peer+"/"+s.Family.String()
		}
		reason := s.Err.Reason
		if o.joining(s) {
			reason = "joining"
		}
		now[key] = reason
		switch {
		case o.skips[key] == reason:
		case reason == "joining":
			o.log.Info("peer not announced yet", "peer", s.Peer, "detail", s.Err.Detail)
		default:
			o.log.Warn("skipping peer", "peer", s.Peer, "family", fam, "reason", s.Err.Reason, "detail", s.Err.Detail)
			o.m.peersSkipped.WithLabelValues(s.Err.Reason).Inc()
		}
	}
	for key := range o.skips {
		if _, ok := now[key]; !ok {
			o.log.Info("peer no longer skipped", "peer", key)
		}
	}
	o.skips = now
}

// joinGrace is how long a new Node may go without any overlay annotation
// before it counts as a skipped peer. Every node sees a joining node's Node
// object before that node's agent has published its VTEP (150-190 ms in
// the lab; longer while its image is pulled): that is a node joining, not
// bad input, and warning and counting it would make an alert on
// knit_overlay_peers_skipped_total fire at every join.
const joinGrace = 2 * time.Minute

// joining reports whether the skip (of the whole peer or of one family)
// is a young Node that has published no overlay annotation at all yet. It becomes an ordinary skip (a warning and a
// count) at the first sync after joinGrace: a timer sync comes at least
// every SyncPeriod.
func (o *Overlay) joining(s skip) bool {
	if s.Err.Reason != reasonMissingAnnotation {
		return false
	}
	n, err := o.nodes.Get(s.Peer)
	if err != nil || n.CreationTimestamp.IsZero() || time.Since(n.CreationTimestamp.Time) >= joinGrace {
		return false
	}
	for _, k := range ownedKeys {
		if _, ok := n.Annotations[k]; ok {
			return false
		}
	}
	return true
}

// reportProgrammed sets the programmed-peers gauge once a sync has put
// every rendered peer's entries in the kernel (after a failed apply it
// keeps the last good count; the errors counter says why).
func (o *Overlay) reportProgrammed(rd rendered) {
	count := map[string]int{"vxlan": 0, "direct": 0, "mixed": 0}
	for _, how := range rd.Programmed {
		count[how]++
	}
	for how, n := range count {
		o.m.peersProgrammed.WithLabelValues(how).Set(float64(n))
	}
}

// publishLoop writes this node's annotations whenever they differ from what
// the cache shows, retrying failures with backoff. It runs apart from the
// sync loop so an unreachable API server never delays kernel syncs.
func (o *Overlay) publishLoop(ctx context.Context) {
	var want map[string]string
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			retry.Stop()
			return
		case want = <-o.publish:
		case <-retry.C:
		}
		if want == nil {
			continue
		}
		if err := o.publishOnce(ctx, want); err != nil {
			failures++
			delay := min(firstRetry<<min(failures-1, 16), o.cfg.SyncPeriod)
			o.m.errors.WithLabelValues("annotations").Inc()
			o.log.Warn("publishing node annotations failed; retrying", "err", err, "retryIn", delay)
			retry.Reset(delay)
			continue
		}
		failures = 0
		retry.Stop()
	}
}

func (o *Overlay) publishOnce(ctx context.Context, want map[string]string) error {
	self, err := o.nodes.Get(o.cfg.NodeName)
	if err != nil {
		return fmt.Errorf("own node: %w", err)
	}
	patch, err := annotationPatch(self.Annotations, want)
	if err != nil || patch == nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, patchTimeout)
	defer cancel()
	// A merge patch of our own Node's annotations only: no read-modify-write
	// race with the kubelet or anyone else.
	_, err = o.client.CoreV1().Nodes().Patch(ctx, o.cfg.NodeName, types.MergePatchType, patch,
		metav1.PatchOptions{FieldManager: "knit-overlay"})
	if err != nil {
		return fmt.Errorf("patch node %s: %w", o.cfg.NodeName, err)
	}
	o.log.Info("published node annotations", "patch", string(patch))
	return nil
}

// internalIPs are the Node's InternalIP addresses, in order.
func internalIPs(n *corev1.Node) []netip.Addr {
	if n == nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Unmap().IsGlobalUnicast() {
			out = append(out, ip.Unmap())
		}
	}
	return out
}
