package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/knftables"

	"knit.dev/knit/cni/hostport"
	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
	"knit.dev/knit/status"
)

const (
	// minSyncInterval bounds how often bursts of events cause a sync.
	minSyncInterval = 200 * time.Millisecond
	// firstRetry is the first delay after a failed sync; it doubles up to
	// SyncPeriod.
	firstRetry = time.Second
	// mtuPoll is how often Config.MTU is asked for a change: the overlay
	// has no event to send, and asking is an atomic load.
	mtuPoll = time.Second
)

// Setup is the CNI node setup component.
type Setup struct {
	cfg         Config
	log         *slog.Logger
	m           *metrics
	nodes       corelisters.NodeLister
	nodesSynced cache.InformerSynced
	pods        podLister // nil: no reconciliation
	podsSynced  cache.InformerSynced

	// Replaced by tests.
	k           kernel
	newNFT      func() (knftables.Interface, error)
	now         func() time.Time
	netnsExists func(string) bool
	bootID      func() string

	installed installCheck // the plugin binary as the last install left it

	trigger chan struct{} // this Node changed; capacity 1, events coalesce
	ready   atomic.Bool
	pools   atomic.Pointer[[]netip.Prefix] // podCIDRs of the last node.json, for metrics
	store   atomic.Pointer[ipam.Store]

	// For Status: each sync's outcome, what was applied, what it waits for.
	syncRec       status.SyncRecorder
	snap          atomic.Pointer[status.CNI]
	waitingStatus atomic.Pointer[string]

	// Owned by the Run goroutine.
	applied  *desired       // last state fully applied
	previous []netip.Prefix // podCIDRs of node.json as first found, and as written since
	waiting  string         // what the last sync waited for
	warned   map[string]bool
}

// New builds the node setup and registers its informer handlers; it
// touches neither the kernel nor the file system (Run does).
func New(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger) (*Setup, error) {
	cfg, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	if src.Nodes == nil {
		return nil, errors.New("cni node setup needs the Node informer")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Setup{
		cfg:         cfg,
		log:         log,
		nodes:       src.Nodes.Lister(),
		k:           netlinkKernel{},
		newNFT:      hostport.New,
		now:         time.Now,
		netnsExists: netnsExists,
		bootID:      ipam.BootID,
		trigger:     make(chan struct{}, 1),
		warned:      map[string]bool{},
	}
	if s.m, err = newMetrics(reg, s); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	inf := src.Nodes.Informer()
	s.nodesSynced = inf.HasSynced
	mine := func(obj any) bool {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		n, ok := obj.(*corev1.Node)
		return ok && n.Name == cfg.NodeName
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if mine(obj) {
				s.kick()
			}
		},
		UpdateFunc: func(old, cur any) {
			// Most Node updates are status heartbeats; only podCIDRs matter.
			if mine(cur) && podCIDRsChanged(old, cur) {
				s.kick()
			}
		},
		DeleteFunc: func(obj any) {
			if mine(obj) {
				s.kick()
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("node event handler: %w", err)
	}
	if src.Pods != nil {
		pinf := src.Pods.Informer()
		if err := pinf.AddIndexers(cache.Indexers{podsByNode: podNodeIndex}); err != nil {
			return nil, fmt.Errorf("pod index: %w", err)
		}
		s.pods = indexedPods{pinf.GetIndexer()}
		s.podsSynced = pinf.HasSynced
	}
	log.Info("cni node setup configured", "node", cfg.NodeName, "bridge", cfg.Bridge,
		"conflist", filepath.Join(cfg.ConfDir, cfg.ConfName), "nodeConfig", plugin.NodeConfigPath(cfg.RunDir),
		"ipam", plugin.IPAMDir(cfg.StateDir), "binary", cfg.BinaryPath, "install", cfg.Install,
		"reconcile", s.pods != nil)
	return s, nil
}

func podCIDRsChanged(old, cur any) bool {
	a, ok1 := old.(*corev1.Node)
	b, ok2 := cur.(*corev1.Node)
	return !ok1 || !ok2 || a.Spec.PodCIDR != b.Spec.PodCIDR || !slices.Equal(a.Spec.PodCIDRs, b.Spec.PodCIDRs)
}

// Name is the component name.
func (s *Setup) Name() string { return "cni" }

// Ready reports whether node.json and the conflist have been written (and
// the bridge, settings and binary were in place before them).
func (s *Setup) Ready() bool { return s.ready.Load() }

// kick asks the sync loop for a sync; never blocks.
func (s *Setup) kick() {
	select {
	case s.trigger <- struct{}{}:
	default:
	}
}

// Run syncs until ctx is done. It removes nothing when it returns: the
// bridge, settings and files stay, so pods keep their network and the
// runtime can keep creating pods while the agent restarts.
func (s *Setup) Run(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), s.nodesSynced) {
		return nil // ctx done
	}
	s.loadPrevious()

	var mtuC, reconcileC <-chan time.Time
	lastMTU := 0
	if s.cfg.MTU != nil {
		t := time.NewTicker(mtuPoll)
		defer t.Stop()
		mtuC = t.C
		lastMTU = s.cfg.MTU()
	}
	if s.pods != nil {
		t := time.NewTicker(s.cfg.ReconcilePeriod)
		defer t.Stop()
		reconcileC = t.C
	}

	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastSync time.Time
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.trigger:
		case <-timer.C:
		case <-mtuC:
			mtu := s.cfg.MTU()
			if mtu == lastMTU {
				continue
			}
			lastMTU = mtu
		case <-reconcileC:
			if s.podsSynced() && s.ready.Load() {
				if err := s.reconcile(); err != nil {
					s.m.syncErrors.WithLabelValues("reconcile").Inc()
					s.log.Warn("IPAM reconciliation against this node's pods failed", "err", err)
				}
			}
			continue
		}
		if wait := minSyncInterval - time.Since(lastSync); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
		select { // events up to now are part of this sync
		case <-s.trigger:
		default:
		}
		lastSync = time.Now()
		err := s.sync()
		s.syncRec.Record(err)
		if err != nil {
			failures++
			delay := min(firstRetry<<min(failures-1, 16), s.cfg.SyncPeriod)
			s.log.Warn("cni node setup failed; retrying", "err", err, "retryIn", delay)
			timer.Reset(delay)
			continue
		}
		if failures > 0 {
			s.log.Info("cni node setup recovered", "afterFailures", failures)
		}
		failures = 0
		timer.Reset(s.cfg.SyncPeriod)
	}
}

// loadPrevious remembers the podCIDRs of a node.json left by an earlier
// run, so that their gateway addresses count as knit's to remove from the
// bridge if the node's podCIDR has changed since.
func (s *Setup) loadPrevious() {
	if nc, err := plugin.ReadNodeConfig(s.cfg.RunDir); err == nil {
		s.previous = nc.PodCIDRs
	}
}

// mtu is the pod MTU: Config.MTU's, or the default route interface's.
func (s *Setup) mtu() (int, error) {
	if s.cfg.MTU != nil {
		return s.cfg.MTU(), nil
	}
	mtu, err := s.k.defaultRouteMTU()
	if err != nil {
		return 0, err
	}
	if mtu == 0 {
		mtu = plugin.DefaultMTU
	}
	return mtu, nil
}

// sync renders the node's desired state and applies it, in the order that
// keeps the plugin's view consistent: kernel (bridge, settings), node.json,
// binary, and the conflist last, so that a runtime that sees the conflist
// finds everything it points at.
func (s *Setup) sync() error {
	n, err := s.nodes.Get(s.cfg.NodeName)
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	mtu, err := s.mtu()
	if err != nil {
		s.m.syncErrors.WithLabelValues("kernel").Inc()
		return fmt.Errorf("pod MTU from the default route: %w", err)
	}
	d, wait, err := render(&s.cfg, n, mtu)
	if err != nil {
		// Nothing to retry until the Node or the MTU changes, which kicks
		// a sync; the timer resyncs anyway.
		s.warnOnce("render:"+err.Error(), "cannot set up pod networking on this node", "err", err)
		s.setWaiting("a usable node network config")
		return nil
	}
	if wait != "" {
		s.setWaiting(wait)
		return nil
	}
	s.setWaiting("")

	if err := s.applyKernel(d); err != nil {
		s.m.syncErrors.WithLabelValues("kernel").Inc()
		return err
	}
	if s.applied != nil && !slices.Equal(s.applied.node.PodCIDRs, d.node.PodCIDRs) {
		s.log.Warn("this node's podCIDRs changed; running pods keep their old addresses until they are recreated",
			"old", s.applied.node.PodCIDRs, "new", d.node.PodCIDRs)
	}
	nodePath := plugin.NodeConfigPath(s.cfg.RunDir)
	wrote, err := writeIfChanged(nodePath, d.nodeJSON, 0o644)
	if err != nil {
		s.m.syncErrors.WithLabelValues("files").Inc()
		return fmt.Errorf("write %s: %w", nodePath, err)
	}
	if wrote {
		s.log.Info("node network config written", "path", nodePath, "podCIDRs", d.node.PodCIDRs, "mtu", d.node.MTU, "bridge", d.node.Bridge)
	}
	for _, p := range d.node.PodCIDRs {
		if !slices.Contains(s.previous, p) {
			s.previous = append(s.previous, p)
		}
	}
	pools := slices.Clone(d.node.PodCIDRs)
	s.pools.Store(&pools)
	if _, err := s.openStore(); err != nil {
		// Only metrics and the reconciliation read it; the plugin opens
		// its own.
		s.log.Debug("IPAM store not readable yet", "err", err)
	}

	if s.cfg.BinaryPath != "" {
		dst := filepath.Join(s.cfg.BinDir, plugin.PluginType)
		changed := false
		if !s.installed.current(s.cfg.BinaryPath, dst) {
			var err error
			if changed, err = installBinary(s.cfg.BinaryPath, dst, s.cfg.Install); err != nil {
				s.m.syncErrors.WithLabelValues("binary").Inc()
				return fmt.Errorf("install %s as %s: %w", s.cfg.BinaryPath, dst, err)
			}
			s.installed.remember(s.cfg.BinaryPath, dst)
		}
		if changed {
			s.log.Info("CNI plugin installed", "path", dst, "from", s.cfg.BinaryPath, "mode", s.cfg.Install)
		}
	}

	confPath := filepath.Join(s.cfg.ConfDir, s.cfg.ConfName)
	wrote, err = writeIfChanged(confPath, d.conflist, 0o644)
	if err != nil {
		s.m.syncErrors.WithLabelValues("files").Inc()
		return fmt.Errorf("write %s: %w", confPath, err)
	}
	if wrote {
		s.log.Info("CNI network config written", "path", confPath)
	}
	if shadow := shadowingConfs(s.cfg.ConfDir, s.cfg.ConfName); len(shadow) > 0 {
		s.warnOnce("shadow:"+strings.Join(shadow, ","), "other CNI configs sort before knit's; the runtime uses the first one, so pods may not get knit networking (knit does not delete them)",
			"dir", s.cfg.ConfDir, "files", shadow, "ours", s.cfg.ConfName)
	}

	s.applied = d
	s.recordApplied(d)
	if !s.ready.Load() {
		s.log.Info("cni node setup ready", "podCIDRs", d.node.PodCIDRs, "mtu", d.node.MTU)
		s.ready.Store(true)
	}
	return nil
}

// applyKernel makes the bridge and the node-level settings right.
func (s *Setup) applyKernel(d *desired) error {
	owned := func(p netip.Prefix) bool { return ownedGateway(p, s.cfg.ClusterCIDRs, s.previous) }
	if err := s.k.ensureBridge(d.node.Bridge, d.node.MTU, d.node.PodCIDRs, owned); err != nil {
		return err
	}
	var errs []error
	for _, sc := range sysctls(d.node.Bridge, d.node.PodCIDRs) {
		changed, err := s.k.sysctl(sc.path, sc.value)
		switch {
		case err != nil && sc.optional && errors.Is(err, fs.ErrNotExist):
			s.warnOnce("sysctl:"+sc.path, "kernel setting not available (is br_netfilter loaded?); traffic between pods of this node through a Service may fail", "sysctl", sc.path)
		case err != nil:
			errs = append(errs, fmt.Errorf("sysctl %s=%s: %w", sc.path, sc.value, err))
		case changed:
			s.log.Info("kernel setting changed", "sysctl", sc.path, "value", sc.value)
		}
	}
	return errors.Join(errs...)
}

// openStore opens the IPAM store once (lazily: opening creates its
// directory).
func (s *Setup) openStore() (*ipam.Store, error) {
	if st := s.store.Load(); st != nil {
		return st, nil
	}
	st, err := ipam.Open(plugin.IPAMDir(s.cfg.StateDir), plugin.NetworkName, ipam.Options{Boot: s.bootID()})
	if err != nil {
		return nil, err
	}
	s.store.Store(st)
	return st, nil
}

func (s *Setup) setWaiting(wait string) {
	if wait != "" && wait != s.waiting {
		s.log.Info("cni node setup waiting", "for", wait)
	}
	s.waiting = wait
	s.waitingStatus.Store(&wait)
}

func (s *Setup) warnOnce(key, msg string, args ...any) {
	if s.warned[key] {
		return
	}
	s.warned[key] = true
	s.log.Warn(msg, args...)
}
