package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/knftables"
)

// Backends.
const (
	BackendAuto     = "auto"
	BackendNFTables = "nftables"
	BackendIPTables = "iptables"
	// The iptables backend with the variant forced (see iptables_detect.go).
	BackendIPTablesLegacy = "iptables-legacy"
	BackendIPTablesNFT    = "iptables-nft"
)

// Config holds the proxy's settings. Zero values take the defaults of
// DefaultConfig.
type Config struct {
	// NodeName is this node's name: endpoints with this nodeName are local
	// (traffic policies Local, hairpin, health checks).
	NodeName string
	// NodeIPs are this node's addresses; with NodePortAddresses they pick
	// the addresses that accept NodePorts.
	NodeIPs []netip.Addr
	// ClusterCIDRs are the Pod CIDRs: traffic from them is "inside the
	// cluster" (ClusterIP traffic from elsewhere is masqueraded; pod
	// traffic to external addresses of a Local Service short-circuits).
	ClusterCIDRs []netip.Prefix
	// ServiceCIDRs are the ClusterIP ranges: traffic to an address in them
	// that is no Service is dropped rather than routed out.
	ServiceCIDRs []netip.Prefix
	// LocalServiceIPs are Service IPs that a process on this node answers
	// itself: knit's cluster DNS listens on the DNS Service's ClusterIP
	// (10.43.0.10) on every node, so queries never leave the node and need
	// no conntrack entry or DNAT. For a Service whose ClusterIP is listed
	// here no rules at all are emitted for that ClusterIP (no DNAT, no
	// reject when it has no endpoints, and it is exempt from the "undefined
	// ClusterIP port" checks).
	LocalServiceIPs []netip.Addr
	// MinSyncPeriod is the least time between two syncs (changes arriving
	// meanwhile are batched). Default 100ms.
	MinSyncPeriod time.Duration
	// NewServiceHoldOff is how long a new Service that has no EndpointSlice
	// yet waits for its first slice before it is synced without one. A
	// Service and its slice are written one after the other (by a user, or
	// by the endpointslice controller once it sees the Service), so without
	// the wait nearly every new Service costs two syncs, the second one
	// MinSyncPeriod after the first. Changes to existing Services are never
	// held. Default 250ms; negative: no wait.
	NewServiceHoldOff time.Duration
	// SyncPeriod is the full resync period: the whole table is re-rendered
	// and replaced, repairing any drift. Default 10m.
	SyncPeriod time.Duration
	// Backend is "nftables", "iptables" (or "iptables-legacy",
	// "iptables-nft" to force the variant) or "auto" (default: nftables
	// when the nft binary and kernel support work, else iptables).
	Backend string
	// MasqueradeMark is the packet mark bit that asks for masquerading in
	// postrouting; one bit. Default 0x4000 (kube-proxy's).
	MasqueradeMark uint32
	// NodePortAddresses limits NodePorts to node addresses in these
	// prefixes (NodeIPs and the Node's status addresses). Empty: every
	// local address except loopback.
	NodePortAddresses []netip.Prefix
	// HealthCheckBindAddress is where healthCheckNodePort servers listen.
	// Invalid (zero): all addresses.
	HealthCheckBindAddress netip.Addr
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		MinSyncPeriod:     100 * time.Millisecond,
		NewServiceHoldOff: 250 * time.Millisecond,
		SyncPeriod:        10 * time.Minute,
		Backend:           BackendAuto,
		MasqueradeMark:    0x4000,
	}
}

func (c *Config) defaults() error {
	d := DefaultConfig()
	if c.MinSyncPeriod <= 0 {
		c.MinSyncPeriod = d.MinSyncPeriod
	}
	if c.SyncPeriod <= 0 {
		c.SyncPeriod = d.SyncPeriod
	}
	if c.NewServiceHoldOff == 0 {
		c.NewServiceHoldOff = d.NewServiceHoldOff
	}
	if c.Backend == "" {
		c.Backend = d.Backend
	}
	if c.MasqueradeMark == 0 {
		c.MasqueradeMark = d.MasqueradeMark
	}
	if bits.OnesCount32(c.MasqueradeMark) != 1 {
		return fmt.Errorf("masquerade mark %#x must be a single bit", c.MasqueradeMark)
	}
	switch c.Backend {
	case BackendAuto, BackendNFTables, BackendIPTables, BackendIPTablesLegacy, BackendIPTablesNFT:
	default:
		return fmt.Errorf("unknown backend %q (want nftables, iptables, iptables-legacy, iptables-nft or auto)", c.Backend)
	}
	return nil
}

// Sources are the informers the proxy reads (from the agent's shared cache).
type Sources struct {
	Services       coreinformers.ServiceInformer
	EndpointSlices discoveryinformers.EndpointSliceInformer
	// Nodes gives this node's zone label (topology hints) and addresses
	// (NodePortAddresses). Optional.
	Nodes coreinformers.NodeInformer
}

// Proxier is the service proxy component.
type Proxier struct {
	cfg Config
	log *slog.Logger
	m   *metrics

	synced     []cache.InformerSynced
	svcTracker *serviceTracker
	epTracker  *endpointTracker
	kick       chan struct{}
	needFull   atomic.Bool
	ready      atomic.Bool

	// holdMu guards held: the timer that asks for a sync once the
	// hold-off of a new Service without a slice is over (one at a time).
	holdMu sync.Mutex
	held   *time.Timer

	nodeMu sync.Mutex
	node   nodeView

	status statusState // for Status

	// Owned by the sync goroutine.
	st          state
	backend     *nftBackend
	ipt         *iptBackend // when the iptables backend is in use (backend is then idle)
	ct          conntracker
	hc          *healthServers
	triggers    []time.Time
	ctBefore    map[types.NamespacedName]*serviceInfo
	ctChanged   map[types.NamespacedName]bool
	appliedOnce bool
	// leftovers removes another backend's rules after the first sync.
	leftovers func(context.Context)
}

// nodeView is what the proxy reads from its own Node object.
type nodeView struct {
	zone  string
	addrs []netip.Addr
}

// newNFT opens the knit-proxy table through the nft binary, and a second
// handle that lists object names over netlink (nil if that is unavailable).
func newNFT() (nft, lister knftables.Interface, err error) {
	nft, err = knftables.New(knftables.InetFamily, tableName)
	if err != nil {
		return nil, nil, err
	}
	if nft, err = newBatchingNFT(nft); err != nil {
		return nil, nil, err
	}
	lister, err = knftables.New(knftables.InetFamily, tableName, knftables.UseNetlink)
	if err != nil {
		lister = nil
	}
	return nft, lister, nil
}

// deps are the proxy's ties to the kernel, replaced by fakes in tests.
type deps struct {
	nft    knftables.Interface
	lister knftables.Interface
	ipt    *iptBackend // instead of nft
	ct     conntracker
	listen func(network, addr string) (net.Listener, error)
}

// New builds the proxy and registers its event handlers on src (call it
// before the shared cache starts). It touches no kernel state: nothing is
// applied before Run has seen the informers synced.
func New(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger) (*Proxier, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var d deps
	var err error
	switch cfg.Backend {
	case BackendNFTables, BackendAuto:
		if d.nft, d.lister, err = newNFT(); err != nil && cfg.Backend == BackendNFTables {
			return nil, fmt.Errorf("proxy: nftables not usable: %w", err)
		}
		if err != nil {
			log.Info("nftables not usable, trying iptables", "err", err)
			if d.ipt, err = newIPTables(BackendIPTables, log); err != nil {
				return nil, fmt.Errorf("proxy: neither nftables nor iptables is usable: %w", err)
			}
		}
	default:
		if d.ipt, err = newIPTables(cfg.Backend, log); err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
	}
	d.ct = netlinkConntrack{}
	d.listen = net.Listen
	p, err := newProxier(cfg, src, reg, log, d)
	if err != nil {
		return nil, err
	}
	p.leftovers = p.removeOtherBackend
	return p, nil
}

func newProxier(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger, d deps) (*Proxier, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if src.Services == nil || src.EndpointSlices == nil {
		return nil, errors.New("proxy: Services and EndpointSlices informers are required")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("proxy: metrics: %w", err)
	}
	p := &Proxier{
		cfg:        cfg,
		log:        log,
		m:          m,
		svcTracker: newServiceTracker(),
		epTracker:  newEndpointTracker(time.Now()),
		kick:       make(chan struct{}, 1),
		st: state{
			services:  map[types.NamespacedName]*serviceInfo{},
			endpoints: map[types.NamespacedName]portEndpoints{},
		},
		backend:   newNFTBackend(d.nft, log),
		ct:        d.ct,
		ctBefore:  map[types.NamespacedName]*serviceInfo{},
		ctChanged: map[types.NamespacedName]bool{},
	}
	p.backend.lister = d.lister
	if err := p.initBackend(d.ipt, reg); err != nil {
		return nil, err
	}
	p.hc = newHealthServers(log, cfg.HealthCheckBindAddress, p.ready.Load)
	if d.listen != nil {
		p.hc.listen = d.listen
	}
	p.needFull.Store(true)

	reg1, err := src.Services.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { p.onService(nil, obj) },
		UpdateFunc: p.onService,
		DeleteFunc: func(obj any) { p.onService(obj, nil) },
	})
	if err != nil {
		return nil, fmt.Errorf("proxy: service handler: %w", err)
	}
	reg2, err := src.EndpointSlices.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { p.onSlice(obj, false) },
		UpdateFunc: func(_, obj any) { p.onSlice(obj, false) },
		DeleteFunc: func(obj any) { p.onSlice(obj, true) },
	})
	if err != nil {
		return nil, fmt.Errorf("proxy: endpointslice handler: %w", err)
	}
	p.synced = []cache.InformerSynced{reg1.HasSynced, reg2.HasSynced}
	if src.Nodes != nil {
		reg3, err := src.Nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { p.onNode(obj, false) },
			UpdateFunc: func(_, obj any) { p.onNode(obj, false) },
			DeleteFunc: func(obj any) { p.onNode(obj, true) },
		})
		if err != nil {
			return nil, fmt.Errorf("proxy: node handler: %w", err)
		}
		p.synced = append(p.synced, reg3.HasSynced)
	}
	return p, nil
}

// Name implements the agent's component contract.
func (p *Proxier) Name() string { return "proxy" }

// Ready is true once the informers have synced and the first full sync has
// been applied.
func (p *Proxier) Ready() bool { return p.ready.Load() }

// Run waits for the informers, then runs the sync loop until ctx is done.
// It never removes the rules: a restarted knit replaces them in one
// transaction, so connections keep flowing across restarts.
func (p *Proxier) Run(ctx context.Context) error {
	defer p.hc.closeAll()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !p.allSynced() {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
	p.log.Info("informers synced, starting sync loop", "minSyncPeriod", p.cfg.MinSyncPeriod, "syncPeriod", p.cfg.SyncPeriod)
	p.loop(ctx)
	return nil
}

func (p *Proxier) allSynced() bool {
	for _, s := range p.synced {
		if !s() {
			return false
		}
	}
	return true
}

// requestSync asks the loop for a sync; never blocks.
func (p *Proxier) requestSync() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// requestSyncAfterHoldOff asks for a sync once NewServiceHoldOff has
// passed, unless a sync is asked for sooner (by the Service's slice, or any
// other change), which then takes the held Service along. One timer serves
// every held Service: a Service that arrives while one runs waits less,
// never more.
func (p *Proxier) requestSyncAfterHoldOff() {
	p.holdMu.Lock()
	defer p.holdMu.Unlock()
	if p.held != nil {
		return
	}
	p.held = time.AfterFunc(p.cfg.NewServiceHoldOff, func() {
		p.holdMu.Lock()
		p.held = nil
		p.holdMu.Unlock()
		p.requestSync()
	})
}

// loop is the bounded-frequency runner: a sync runs when asked, at most once
// per MinSyncPeriod; a full one every SyncPeriod; a failed one is retried,
// as a full sync, with backoff.
func (p *Proxier) loop(ctx context.Context) {
	full := time.NewTicker(p.cfg.SyncPeriod)
	defer full.Stop()
	var (
		last    time.Time
		retry   <-chan time.Time
		backoff time.Duration
	)
	p.requestSync() // the first (full) sync
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		case <-retry:
		case <-full.C:
			p.needFull.Store(true)
		}
		retry = nil
		if wait := p.cfg.MinSyncPeriod - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		last = time.Now()
		switch again, err := p.syncOnce(ctx); {
		case err != nil:
			backoff = min(max(2*backoff, time.Second), 30*time.Second)
			retry = time.After(backoff)
		case again > 0:
			backoff = 0
			retry = time.After(again)
		default:
			backoff = 0
		}
	}
}

// syncOnce checks out the trackers and applies. It returns when a follow-up
// sync is needed (to delete stale chains), and the error, if any.
func (p *Proxier) syncOnce(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	// This sync takes every held new Service along: its timer is done.
	p.holdMu.Lock()
	if p.held != nil {
		p.held.Stop()
		p.held = nil
	}
	p.holdMu.Unlock()
	before := p.svcTracker.checkout(p.st.services)
	epChanged, triggers := p.epTracker.checkout(p.st.endpoints)
	p.triggers = append(p.triggers, triggers...)
	changed := make(map[types.NamespacedName]bool, len(before)+len(epChanged))
	for n, info := range before {
		changed[n] = true
		if _, ok := p.ctBefore[n]; !ok {
			p.ctBefore[n] = info
		}
	}
	for n := range epChanged {
		changed[n] = true
	}
	for n := range changed {
		p.ctChanged[n] = true
	}
	full := p.needFull.Swap(false) || !p.appliedOnce
	kind := "partial"
	if full {
		kind = "full"
	}
	p.st.topo, p.st.static = p.view()

	sync := p.backend.sync
	if p.ipt != nil {
		sync = p.ipt.sync
	}
	res, err := sync(ctx, &p.st, changed, full)
	p.status.record(&p.st, res, full, err)
	elapsed := time.Since(start)
	// A sync with nothing to do (a hold-off timer that ran out after its
	// Service was synced, or a later sync that only deletes stale chains)
	// is not a sync worth timing.
	if full || len(changed) > 0 {
		p.m.syncDuration.WithLabelValues(kind).Observe(elapsed.Seconds())
	}
	if err != nil {
		p.m.syncErrors.WithLabelValues(kind).Inc()
		p.needFull.Store(true)
		p.log.Error("sync failed; the next sync is a full one", "kind", kind, "err", err)
		return 0, err
	}
	if !p.appliedOnce && p.leftovers != nil {
		p.leftovers(ctx)
	}
	p.appliedOnce = true
	now := time.Now()
	for _, t := range p.triggers {
		p.m.programmingLatency.Observe(now.Sub(t).Seconds())
	}
	p.triggers = p.triggers[:0]
	p.m.rules.Set(float64(res.rules))
	for _, f := range []family{v4, v6} {
		for _, c := range []string{mapServiceIPs, mapServiceNodePorts, mapNoEPServices, mapNoEPNodePorts, mapFirewallIPs,
			setClusterIPs, setNodePortIPs, setHairpin, setLocalServiceIPs, setClusterCIDRs} {
			name := perFamily(c, f)
			p.m.elements.WithLabelValues(name).Set(float64(res.elementsBy[name]))
		}
		for _, proto := range l4protos {
			name := endpointsMap(f, proto)
			p.m.elements.WithLabelValues(name).Set(float64(res.elementsBy[name]))
		}
	}
	p.m.noLocalEndpoints.Set(float64(res.noLocal))
	p.m.lastSync.Set(float64(now.Unix()))
	p.ready.Store(true)
	p.hc.update(healthChecks(&p.st))
	p.cleanConntrack()
	p.log.Debug("synced", "kind", kind, "changedServices", len(changed), "services", len(p.st.services),
		"rules", res.rules, "elements", res.elements, "elapsed", elapsed)
	if len(p.backend.stale) > 0 {
		return staleChainDelay + 100*time.Millisecond, nil
	}
	return 0, nil
}

func (p *Proxier) cleanConntrack() {
	if len(p.ctChanged) == 0 || p.ct == nil {
		return
	}
	filters := staleUDPFilters(&p.st, p.ctBefore, p.ctChanged)
	clear(p.ctBefore)
	clear(p.ctChanged)
	for f, flt := range filters {
		n, err := p.ct.deleteUDP(f, flt)
		if err != nil {
			p.m.conntrackErrors.Inc()
			p.log.Warn("deleting stale UDP conntrack entries failed", "family", f.String(), "err", err)
			continue
		}
		if n > 0 {
			p.m.conntrackDeleted.Add(float64(n))
			p.log.Debug("deleted stale UDP conntrack entries", "family", f.String(), "entries", n)
		}
	}
}

// view computes the node-dependent part of the state.
func (p *Proxier) view() (topology, *staticConfig) {
	p.nodeMu.Lock()
	nv := p.node
	p.nodeMu.Unlock()
	sc := &staticConfig{
		masqMark:        fmt.Sprintf("%#x", p.cfg.MasqueradeMark),
		clusterCIDRs:    joinPrefixes(p.cfg.ClusterCIDRs),
		serviceCIDRs:    joinPrefixes(p.cfg.ServiceCIDRs),
		localServiceIPs: map[family][]netip.Addr{},
	}
	for _, a := range append(slices.Clone(p.cfg.NodeIPs), nv.addrs...) {
		if a = a.Unmap(); !slices.Contains(sc.nodeIPs, a) {
			sc.nodeIPs = append(sc.nodeIPs, a)
		}
	}
	for _, a := range p.cfg.LocalServiceIPs {
		sc.localServiceIPs[familyOf(a.Unmap())] = append(sc.localServiceIPs[familyOf(a.Unmap())], a.Unmap())
	}
	if len(p.cfg.NodePortAddresses) > 0 {
		sc.nodePortIPs = map[family][]netip.Addr{}
		seen := map[netip.Addr]bool{}
		for _, a := range append(slices.Clone(p.cfg.NodeIPs), nv.addrs...) {
			a = a.Unmap()
			if seen[a] || a.IsLoopback() {
				continue
			}
			for _, pfx := range p.cfg.NodePortAddresses {
				if pfx.Contains(a) {
					seen[a] = true
					sc.nodePortIPs[familyOf(a)] = append(sc.nodePortIPs[familyOf(a)], a)
					break
				}
			}
		}
	}
	return topology{node: p.cfg.NodeName, zone: nv.zone}, sc
}

func joinPrefixes(ps []netip.Prefix) map[family]string {
	out := map[family]string{}
	for _, f := range []family{v4, v6} {
		var s []string
		for _, p := range ps {
			if familyOf(p.Addr().Unmap()) == f {
				s = append(s, p.Masked().String())
			}
		}
		if len(s) > 0 {
			out[f] = strings.Join(s, ", ")
		}
	}
	return out
}

// invalid logs and counts a Service or EndpointSlice the rules cannot
// express (or the part of it that is skipped).
func (p *Proxier) invalid(kind string, obj types.NamespacedName, reason string) {
	p.m.invalid.WithLabelValues(kind).Inc()
	p.log.Warn("skipping what rules cannot express", "kind", kind, "object", obj.String(), "reason", reason)
}

func quiet(string, types.NamespacedName, string) {}

func (p *Proxier) onService(oldObj, newObj any) {
	oldSvc := asService(oldObj)
	newSvc := asService(newObj)
	var name types.NamespacedName
	switch {
	case newSvc != nil:
		name = types.NamespacedName{Namespace: newSvc.Namespace, Name: newSvc.Name}
	case oldSvc != nil:
		name = types.NamespacedName{Namespace: oldSvc.Namespace, Name: oldSvc.Name}
	default:
		return
	}
	prev := convertService(oldSvc, p.cfg.LocalServiceIPs, quiet)
	cur := convertService(newSvc, p.cfg.LocalServiceIPs, p.invalid)
	if !p.svcTracker.update(name, prev, cur) {
		return
	}
	// A brand-new Service whose slice has not arrived yet waits for it
	// (bounded), so that both go in one sync. Not before the first sync:
	// the informers' initial list is synced all at once anyway.
	if oldObj == nil && cur != nil && p.cfg.NewServiceHoldOff > 0 && p.ready.Load() && !p.epTracker.has(name) {
		p.requestSyncAfterHoldOff()
		return
	}
	p.requestSync()
}

func asService(obj any) *corev1.Service {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	s, _ := obj.(*corev1.Service)
	return s
}

func (p *Proxier) onSlice(obj any, deleted bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	svc, ok := sliceService(s)
	if !ok {
		return
	}
	var info *sliceInfo
	if !deleted {
		info = convertSlice(s, p.cfg.NodeName, p.invalid)
	}
	if p.epTracker.update(svc, s.Name, info, lastChangeTrigger(s)) {
		p.requestSync()
	}
}

func (p *Proxier) onNode(obj any, deleted bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	n, ok := obj.(*corev1.Node)
	if !ok || n.Name != p.cfg.NodeName {
		return
	}
	var nv nodeView
	if !deleted {
		nv.zone = n.Labels[corev1.LabelTopologyZone]
		for _, a := range n.Status.Addresses {
			if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
				continue
			}
			if ip, err := netip.ParseAddr(a.Address); err == nil {
				nv.addrs = append(nv.addrs, ip.Unmap())
			}
		}
		slices.SortFunc(nv.addrs, netip.Addr.Compare)
	}
	p.nodeMu.Lock()
	same := p.node.zone == nv.zone && slices.Equal(p.node.addrs, nv.addrs)
	p.node = nv
	p.nodeMu.Unlock()
	if !same {
		// Topology and NodePort addresses affect every Service.
		p.needFull.Store(true)
		p.requestSync()
	}
}
