package dns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"

	"sigs.k8s.io/knftables"

	"knit.dev/knit/dns/localaddr"
	"knit.dev/knit/internal/restartguard"
	"knit.dev/knit/status"
)

// Sources are the informers the DNS component reads.
type Sources struct {
	Services       coreinformers.ServiceInformer
	EndpointSlices discoveryinformers.EndpointSliceInformer
	// Pods enables the pod records (<a-b-c-d>.<ns>.pod.<zone>) in
	// CoreDNS's "verified" mode: answered only when a Pod in that
	// namespace has that IP. Nil disables pod records.
	Pods coreinformers.PodInformer
}

// Server is the cluster DNS component.
type Server struct {
	cfg Config
	log *slog.Logger
	m   *metrics

	src     Sources
	tracker *tracker
	records *recordBuilder
	idx     *index
	cache   *cache
	fwd     *forwarder

	synced  atomic.Bool
	ttl     uint32
	syncRec status.SyncRecorder // for Status

	zoneWire []byte // "\x07cluster\x05local\x00"
	soaTail  []byte
	revV4    []netip.Prefix
	revV6    []netip.Prefix

	workers sync.Pool

	boundMu sync.Mutex
	bound   []netip.AddrPort

	// newNFT opens the restart guard's table (Config.RestartGuard).
	newNFT func() (knftables.Interface, error)
}

// New builds the DNS server and registers its event handlers on the
// informers; nothing is served until Run.
func New(cfg Config, src Sources, reg prometheus.Registerer, log *slog.Logger) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if src.Services == nil || src.EndpointSlices == nil {
		return nil, errors.New("dns needs the Service and EndpointSlice informers")
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	s := &Server{
		newNFT: func() (knftables.Interface, error) {
			return knftables.New(knftables.InetFamily, guardTable)
		},
		cfg: cfg,
		log: log,
		m:   m,
		src: src,
		ttl: uint32(cfg.TTL / time.Second),
	}
	if s.ttl == 0 {
		s.ttl = 1
	}
	s.workers.New = func() any { return newWorker() }
	s.records = newRecordBuilder(cfg.ClusterDomain, s.ttl)
	zone := s.records.zone
	buf := make([]byte, maxName+1)
	zw, ok := wireName(zone, buf)
	if !ok {
		return nil, fmt.Errorf("cluster domain %q is not a domain name", cfg.ClusterDomain)
	}
	s.zoneWire = []byte(zw)
	for _, p := range append(append([]netip.Prefix(nil), cfg.ServiceCIDRs...), cfg.ClusterCIDRs...) {
		p = p.Masked()
		if p.Addr().Is4() {
			s.revV4 = append(s.revV4, p)
		} else {
			s.revV6 = append(s.revV6, p)
		}
	}
	soa := &mdns.SOA{
		Hdr:     mdns.RR_Header{Name: zone, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: s.ttl},
		Ns:      "ns.dns." + zone,
		Mbox:    "hostmaster." + zone,
		Serial:  uint32(time.Now().Unix()),
		Refresh: 7200,
		Retry:   1800,
		Expire:  86400,
		Minttl:  s.ttl,
	}
	if s.soaTail, err = packSOATail(soa); err != nil {
		return nil, fmt.Errorf("SOA: %w", err)
	}
	s.idx = newIndex([]string{zw, "\x07in-addr\x04arpa\x00", "\x03ip6\x04arpa\x00"})
	s.idx.set("static", s.records.static(soa, cfg.LocalIPs, src.Pods != nil))
	s.idx.commit()

	s.cache = newCache(cfg.CacheSize, cfg.CacheMaxTTL, cfg.CacheMaxNegativeTTL)
	if s.fwd, err = newForwarder(cfg, s.cache, m, log); err != nil {
		return nil, err
	}
	if err := m.registerGauges(reg,
		func() float64 { return float64(s.idx.len()) },
		func() float64 { return float64(s.cache.len()) }); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	if s.tracker, err = newTracker(src, log); err != nil {
		return nil, err
	}
	return s, nil
}

// Name is the component name.
func (s *Server) Name() string { return "dns" }

// Ready reports whether the informers have synced and the first full set of
// records is being served.
func (s *Server) Ready() bool { return s.synced.Load() }

// Bound returns the addresses being served (after Run has bound them);
// useful when a listen address had port 0.
func (s *Server) Bound() []netip.AddrPort {
	s.boundMu.Lock()
	defer s.boundMu.Unlock()
	return append([]netip.AddrPort(nil), s.bound...)
}

// Run binds the listen addresses (after creating the local address when
// BindLocalIP is set), keeps the records in step with the cache and serves
// until ctx is done. It returns nil on a clean stop and leaves knit-dns0 in
// place.
func (s *Server) Run(ctx context.Context) error {
	if s.cfg.BindLocalIP {
		if err := localaddr.Ensure(LocalLinkName, s.cfg.LocalIPs); err != nil {
			return fmt.Errorf("local DNS address: %w", err)
		}
	}
	var (
		udps     []*net.UDPConn
		servers  []*mdns.Server
		bound    []netip.AddrPort
		closeAll = func() {
			for _, c := range udps {
				c.Close()
			}
			for _, srv := range servers {
				if srv.Listener != nil {
					srv.Listener.Close()
				}
				if srv.PacketConn != nil {
					srv.PacketConn.Close()
				}
			}
		}
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, ap := range s.cfg.ListenAddrs {
		uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		if err != nil {
			closeAll()
			return fmt.Errorf("listen udp %s: %w", ap, err)
		}
		_ = uc.SetReadBuffer(4 << 20)
		uap := uc.LocalAddr().(*net.UDPAddr).AddrPort()
		// TCP on the same port (which matters when ap asked for port 0).
		tl, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ap.Addr(), uap.Port())))
		if err != nil {
			uc.Close()
			closeAll()
			return fmt.Errorf("listen tcp %s: %w", ap, err)
		}
		servers = append(servers, s.newMiekgServer(ctx, tl, nil))
		if ap.Addr().IsUnspecified() {
			// Replies must leave from the address each query came
			// to; miekg/dns's UDP loop handles that (IP_PKTINFO).
			servers = append(servers, s.newMiekgServer(ctx, nil, uc))
		} else {
			udps = append(udps, uc)
		}
		bound = append(bound, netip.AddrPortFrom(ap.Addr(), uap.Port()))
	}
	s.boundMu.Lock()
	s.bound = bound
	s.boundMu.Unlock()
	s.log.Info("dns serving", "addrs", bound, "zone", s.records.zone, "upstreams", len(s.fwd.upstreams))

	var wg sync.WaitGroup
	goRun := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	goRun(func() { s.runSync(ctx) })
	goRun(func() { s.fwd.runHealth(ctx) })
	readers := min(runtime.GOMAXPROCS(0), 4)
	for _, uc := range udps {
		for range readers {
			goRun(func() { s.serveUDP(ctx, uc) })
		}
	}
	for _, srv := range servers {
		goRun(func() {
			if err := srv.ActivateAndServe(); err != nil && ctx.Err() == nil {
				s.log.Error("dns server stopped", "err", err)
			}
		})
	}
	goRun(func() { s.fwd.probeLoops(ctx) })
	if g := s.openGuard(ctx, bound); g != nil {
		goRun(func() {
			g.Keep(ctx, func(err error) {
				s.m.guardErrors.WithLabelValues("refresh").Inc()
				s.log.Warn("dns restart guard refresh failed", "err", err)
			})
		})
	}

	<-ctx.Done()
	for _, srv := range servers {
		sctx, c := context.WithTimeout(context.Background(), time.Second)
		_ = srv.ShutdownContext(sctx)
		c()
	}
	closeAll()
	wg.Wait()
	return nil
}

// openGuard installs the restart guard for the bound addresses (best
// effort: without it DNS serves as well, and only an agent restart refuses
// queries).
func (s *Server) openGuard(ctx context.Context, bound []netip.AddrPort) *restartguard.Guard {
	if !s.cfg.RestartGuard {
		return nil
	}
	nft, err := s.newNFT()
	if err == nil {
		g := restartguard.New(nft, guardSpec, s.log, bound)
		if err = g.Install(ctx); err == nil {
			s.log.Info("dns restart guard installed", "guard", g.String())
			return g
		}
	}
	s.m.guardErrors.WithLabelValues("install").Inc()
	s.log.Warn("dns restart guard not installed: queries are refused while the agent restarts", "err", err)
	return nil
}

// newMiekgServer serves TCP (or UDP on an unspecified address) through
// github.com/miekg/dns's server, handing the raw request to the same code as
// the UDP fast path.
func (s *Server) newMiekgServer(ctx context.Context, l net.Listener, pc net.PacketConn) *mdns.Server {
	h := &miekgHandler{s: s, ctx: ctx, tcp: l != nil}
	return &mdns.Server{
		Listener:   l,
		PacketConn: pc,
		Handler:    h,
		UDPSize:    65535,
		// Policy (opcodes, counts) is ours: see query.parse.
		MsgAcceptFunc: func(mdns.Header) mdns.MsgAcceptAction { return mdns.MsgAccept },
		ReadTimeout:   5 * time.Second,
		WriteTimeout:  5 * time.Second,
		IdleTimeout:   func() time.Duration { return 10 * time.Second },
		MaxTCPQueries: 1000,
	}
}

type miekgHandler struct {
	s   *Server
	ctx context.Context
	tcp bool
}

func (h *miekgHandler) ServeDNS(rw mdns.ResponseWriter, r *mdns.Msg) {
	w := h.s.getWorker()
	defer h.s.putWorker(w)
	req, err := r.PackBuffer(w.req)
	if err != nil {
		return
	}
	resp, _ := h.s.handle(h.ctx, w, req, h.tcp, modeBlocking)
	if resp != nil {
		_, _ = rw.Write(resp)
	}
}

// worker is the per-goroutine state of the query path.
type worker struct {
	q       query
	out     []byte
	req     []byte
	key     []byte
	badvers bool
}

func newWorker() *worker {
	return &worker{out: make([]byte, 0, maxTCP), req: make([]byte, 0, 4096), key: make([]byte, 0, maxName+4)}
}

func (s *Server) getWorker() *worker  { return s.workers.Get().(*worker) }
func (s *Server) putWorker(w *worker) { s.workers.Put(w) }

// serveUDP is one reader of a UDP socket. Answers that need no network
// (cluster names, cache hits, errors) are written from this goroutine
// without allocating; forwarding runs in a goroutine of its own, holding one
// of the MaxConcurrentForwards slots.
func (s *Server) serveUDP(ctx context.Context, conn *net.UDPConn) {
	w := newWorker()
	buf := make([]byte, 65536)
	for {
		n, addr, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		req := buf[:n]
		resp, slow := s.handle(ctx, w, req, false, modeFast)
		if slow {
			if !s.fwd.acquire() {
				resp = s.finish(w, s.errorResponse(w.out, &w.q, req, mdns.RcodeServerFailure, true), srcForward, time.Now())
			} else {
				pkt := append([]byte(nil), req...)
				go func() {
					defer s.fwd.release()
					w := s.getWorker()
					defer s.putWorker(w)
					if resp, _ := s.handle(ctx, w, pkt, false, modeHeld); resp != nil {
						_, _ = conn.WriteToUDPAddrPort(resp, addr)
					}
				}()
				continue
			}
		}
		if resp != nil {
			_, _ = conn.WriteToUDPAddrPort(resp, addr)
		}
	}
}

// mode says what handle may do.
type mode int

const (
	// modeFast answers without blocking; queries that need an upstream
	// return slow=true and no response.
	modeFast mode = iota
	// modeHeld may block; the caller holds a forwarding slot.
	modeHeld
	// modeBlocking may block and takes a forwarding slot itself.
	modeBlocking
)

// ServeRaw answers one raw DNS message as if it came over UDP (tcp false) or
// TCP, forwarding inline when needed. It returns nil when nothing should be
// sent. The response aliases a buffer reused by the next call on the same
// goroutine: copy it to keep it. Exposed for tests, fuzzing and benchmarks.
func (s *Server) ServeRaw(ctx context.Context, req []byte, tcp bool) []byte {
	w := s.getWorker()
	defer s.putWorker(w)
	resp, _ := s.handle(ctx, w, req, tcp, modeBlocking)
	if resp == nil {
		return nil
	}
	return append([]byte(nil), resp...)
}

// handle is the query path. See the package documentation for the order of
// decisions.
func (s *Server) handle(ctx context.Context, w *worker, req []byte, tcp bool, md mode) (resp []byte, slow bool) {
	start := time.Now()
	q := &w.q
	w.badvers = false
	switch q.parse(req) {
	case parseDrop:
		s.m.dropped.Inc()
		return nil, false
	case parseFormErr:
		q.edns = false
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeFormatError, false), srcOther, start), false
	case parseFormErrQ:
		q.edns = false
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeFormatError, true), srcOther, start), false
	case parseNotImpl:
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeNotImplemented, false), srcOther, start), false
	}
	if q.edns && q.ednsVersion != 0 {
		// RFC 6891 6.1.3: BADVERS, with the version we support (0).
		w.badvers = true
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeBadVers, true), srcOther, start), false
	}
	if q.tsig {
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeRefused, true), srcOther, start), false
	}
	if q.qclass != mdns.ClassINET {
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeRefused, true), srcOther, start), false
	}
	switch q.qtype {
	case 0, mdns.TypeOPT:
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeFormatError, true), srcOther, start), false
	case mdns.TypeAXFR, mdns.TypeIXFR:
		// No zone transfers: the cluster zone is built from the API,
		// not replicated.
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeRefused, true), srcOther, start), false
	case mdns.TypeTKEY, mdns.TypeTSIG, mdns.TypeMAILA, mdns.TypeMAILB:
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeNotImplemented, true), srcOther, start), false
	}
	limit := q.limit(tcp, s.cfg.UDPSize)

	// The cluster zone and the reverse zones of the cluster's CIDRs.
	if apexOff, ok := s.inZone(q); ok {
		return s.authoritative(ctx, w, req, tcp, md, limit, apexOff, start)
	}
	if apexOff, ok := s.inReverse(q); ok {
		return s.authoritative(ctx, w, req, tcp, md, limit, apexOff, start)
	}
	if s.fwd.probing.Load() && s.fwd.sawProbe(q.presentation()) {
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeRefused, true), srcOther, start), false
	}
	if q.qtype == mdns.TypeANY {
		// RFC 8482: never forwarded, never large.
		return s.finish(w, s.anyAnswer(w.out, q, req, s.ttl, false), srcOther, start), false
	}

	// Everything else is forwarded, through the cache.
	w.key = cacheKey(w.key, q.name, q.qtype, q.do, q.cd)
	if e := s.cache.get(w.key, start.UnixNano()); e != nil {
		s.m.cacheHits.Inc()
		age := uint32((start.UnixNano() - e.stored) / int64(time.Second))
		return s.finish(w, s.emit(w.out, e.wire, nil, q, req, limit, age, e.ttlOffs), srcCache, start), false
	}
	if md == modeFast {
		return nil, true
	}
	s.m.cacheMisses.Inc()
	return s.finish(w, s.forward(ctx, w, req, md, limit), srcForward, start), false
}

// authoritative answers a name of the cluster zone or of a reverse zone.
func (s *Server) authoritative(ctx context.Context, w *worker, req []byte, tcp bool, md mode, limit int, apexOff int, start time.Time) ([]byte, bool) {
	q := &w.q
	if !s.synced.Load() {
		// Not NXDOMAIN: the name may well exist, we do not know yet.
		return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeServerFailure, true), srcCluster, start), false
	}
	n := s.idx.get(q.name)
	if n == nil {
		if q.qtype == mdns.TypeSOA && apexOff == 0 {
			return s.finish(w, s.soaAnswer(w.out, q, req, s.soaTail), srcCluster, start), false
		}
		if apexOff == 0 {
			// A reverse zone apex exists even when empty.
			return s.finish(w, s.negative(w.out, q, req, mdns.RcodeSuccess, apexOff, s.soaTail), srcCluster, start), false
		}
		return s.finish(w, s.negative(w.out, q, req, mdns.RcodeNameError, apexOff, s.soaTail), srcCluster, start), false
	}
	if q.qtype == mdns.TypeANY {
		return s.finish(w, s.anyAnswer(w.out, q, req, s.ttl, true), srcCluster, start), false
	}
	if a := n.answer(q.qtype); a != nil {
		return s.finish(w, s.emit(w.out, a.wire, a.alt, q, req, limit, 0, nil), srcCluster, start), false
	}
	if n.cname != "" {
		if md == modeFast {
			return nil, true
		}
		if md == modeBlocking {
			if !s.fwd.acquire() {
				return s.finish(w, s.errorResponse(w.out, q, req, mdns.RcodeServerFailure, true), srcCluster, start), false
			}
			defer s.fwd.release()
		}
		return s.finish(w, s.chase(ctx, w, req, n, limit), srcCluster, start), false
	}
	if q.qtype == mdns.TypeSOA && apexOff == 0 {
		return s.finish(w, s.soaAnswer(w.out, q, req, s.soaTail), srcCluster, start), false
	}
	// The name exists, the type does not: NODATA.
	return s.finish(w, s.negative(w.out, q, req, mdns.RcodeSuccess, apexOff, s.soaTail), srcCluster, start), false
}

// finish counts an answer.
func (s *Server) finish(w *worker, resp []byte, src source, start time.Time) []byte {
	rc := mdns.RcodeServerFailure
	if len(resp) >= headerLen {
		rc = int(resp[3] & 0x0F)
	}
	if w.badvers {
		rc = mdns.RcodeBadVers
	}
	s.m.queries[typeIndex(w.q.qtype)][rcodeIndex(rc)].Inc()
	s.m.duration[src].Observe(time.Since(start).Seconds())
	return resp
}

// inZone reports whether q's name is in the cluster zone, and where the
// zone apex starts in it.
func (s *Server) inZone(q *query) (int, bool) {
	off := len(q.name) - len(s.zoneWire)
	if off < 0 || !bytes.Equal(q.name[off:], s.zoneWire) {
		return 0, false
	}
	for i := 0; i < q.nlabels; i++ {
		if int(q.labels[i]) == off {
			return off, true
		}
	}
	return 0, false
}

var (
	inAddrArpa = []byte("\x07in-addr\x04arpa\x00")
	ip6Arpa    = []byte("\x03ip6\x04arpa\x00")
)

// inReverse reports whether q's name is a reverse name we answer: one
// inside a configured CIDR (authoritative, apex = the CIDR rounded up to a
// label boundary), or one the index has (a PTR of a ClusterIP or endpoint
// outside the configured CIDRs). The returned offset is where the SOA owner
// starts in the name.
func (s *Server) inReverse(q *query) (int, bool) {
	var suffix []byte
	var bitsPerLabel, maxLabels int
	switch {
	case bytes.HasSuffix(q.name, inAddrArpa):
		suffix, bitsPerLabel, maxLabels = inAddrArpa, 8, 4
	case bytes.HasSuffix(q.name, ip6Arpa):
		suffix, bitsPerLabel, maxLabels = ip6Arpa, 4, 32
	default:
		return 0, false
	}
	off := len(q.name) - len(suffix)
	// Index of the label where the suffix starts.
	si := -1
	for i := 0; i < q.nlabels; i++ {
		if int(q.labels[i]) == off {
			si = i
			break
		}
	}
	if si < 0 {
		return 0, false
	}
	// Read the address labels, most significant first (right to left).
	var addr [16]byte
	n := 0
	for i := si - 1; i >= 0 && n < maxLabels; i-- {
		o := int(q.labels[i])
		l := int(q.name[o])
		lab := q.name[o+1 : o+1+l]
		if bitsPerLabel == 8 {
			v, ok := parseOctet(lab)
			if !ok {
				break
			}
			addr[n] = v
		} else {
			v, ok := parseNibble(lab)
			if !ok {
				break
			}
			addr[n/2] |= v << (4 * (1 - n%2))
		}
		n++
	}
	bits := n * bitsPerLabel
	var ip netip.Addr
	var cidrs []netip.Prefix
	if bitsPerLabel == 8 {
		ip = netip.AddrFrom4([4]byte(addr[:4]))
		cidrs = s.revV4
	} else {
		ip = netip.AddrFrom16(addr)
		cidrs = s.revV6
	}
	for _, p := range cidrs {
		if bits < p.Bits() || !p.Contains(ip) {
			continue
		}
		apexLabels := (p.Bits() + bitsPerLabel - 1) / bitsPerLabel
		if apexLabels == 0 {
			apexLabels = 1
		}
		return int(q.labels[si-apexLabels]), true
	}
	// Outside the configured CIDRs: answer only what the index knows.
	if n == maxLabels && si == maxLabels && s.synced.Load() && s.idx.get(q.name) != nil {
		return off, true
	}
	return 0, false
}

func parseOctet(b []byte) (byte, bool) {
	if len(b) == 0 || len(b) > 3 || (len(b) > 1 && b[0] == '0') {
		return 0, false
	}
	v := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + int(c-'0')
	}
	if v > 255 {
		return 0, false
	}
	return byte(v), true
}

func parseNibble(b []byte) (byte, bool) {
	if len(b) != 1 {
		return 0, false
	}
	c := b[0]
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// forward answers q from upstreams (the cache missed).
func (s *Server) forward(ctx context.Context, w *worker, req []byte, md mode, limit int) []byte {
	q := &w.q
	if md == modeBlocking {
		if !s.fwd.acquire() {
			return s.errorResponse(w.out, q, req, mdns.RcodeServerFailure, true)
		}
		defer s.fwd.release()
	}
	if !s.fwd.usable() {
		return s.errorResponse(w.out, q, req, mdns.RcodeServerFailure, true)
	}
	m := new(mdns.Msg)
	if err := m.Unpack(req); err != nil || len(m.Question) != 1 {
		return s.errorResponse(w.out, q, req, mdns.RcodeFormatError, true)
	}
	// Pass the client's EDNS through (DO bit, options), asking for our
	// payload size; drop any other additional record.
	var opt *mdns.OPT
	for _, rr := range m.Extra {
		if o, ok := rr.(*mdns.OPT); ok {
			opt = o
		}
	}
	m.Extra = nil
	if opt != nil {
		opt.SetUDPSize(uint16(s.cfg.UDPSize))
		m.Extra = []mdns.RR{opt}
	}
	m.Response, m.Authoritative, m.Truncated = false, false, false
	ctx, cancel := context.WithTimeout(ctx, 2*s.cfg.UpstreamTimeout)
	defer cancel()
	e, err := s.fwd.resolve(ctx, string(w.key), m)
	if err != nil {
		s.log.Debug("forward failed", "name", m.Question[0].Name, "type", mdns.TypeToString[q.qtype], "err", err)
		return s.errorResponse(w.out, q, req, mdns.RcodeServerFailure, true)
	}
	return s.emit(w.out, e.wire, nil, q, req, limit, 0, nil)
}

// chase answers a query at an ExternalName Service's name: the CNAME, then
// the records of its target, looked up in the index when the target is in
// the cluster zone and forwarded otherwise (a stub resolver does not chase
// CNAMEs itself).
func (s *Server) chase(ctx context.Context, w *worker, req []byte, n *rnode, limit int) []byte {
	q := &w.q
	owner := q.presentation()
	resp := &mdns.Msg{
		MsgHdr:   mdns.MsgHdr{Response: true, Authoritative: true, RecursionAvailable: true},
		Question: []mdns.Question{{Name: owner, Qtype: q.qtype, Qclass: mdns.ClassINET}},
		Compress: true,
	}
	buf := make([]byte, maxName+1)
	cur, target := owner, n.cname
	seen := map[string]bool{owner: true}
	for depth := 0; ; depth++ {
		resp.Answer = append(resp.Answer, &mdns.CNAME{
			Hdr:    mdns.RR_Header{Name: cur, Rrtype: mdns.TypeCNAME, Class: mdns.ClassINET, Ttl: s.ttl},
			Target: target,
		})
		if depth >= 8 || seen[target] {
			resp.Rcode = mdns.RcodeServerFailure
			break
		}
		seen[target] = true
		key, ok := wireName(target, buf)
		if !ok {
			resp.Rcode = mdns.RcodeServerFailure
			break
		}
		if mdns.IsSubDomain(s.records.zone, target) {
			tn := s.idx.get([]byte(key))
			if tn == nil {
				resp.Rcode = mdns.RcodeNameError
				resp.Ns = []mdns.RR{s.soaRR()}
				break
			}
			if rrs := tn.rrs(q.qtype); len(rrs) > 0 {
				resp.Answer = append(resp.Answer, rrs...)
				break
			}
			if tn.cname != "" {
				cur, target = target, tn.cname
				continue
			}
			resp.Ns = []mdns.RR{s.soaRR()}
			break
		}
		// Outside the cluster: the forwarding cache, then upstreams.
		fq := new(mdns.Msg)
		fq.SetQuestion(target, q.qtype)
		fq.CheckingDisabled = q.cd
		if q.edns {
			fq.SetEdns0(uint16(s.cfg.UDPSize), q.do)
		}
		w.key = cacheKey(w.key, []byte(key), q.qtype, q.do, q.cd)
		now := time.Now()
		e := s.cache.get(w.key, now.UnixNano())
		age := uint32(0)
		if e != nil {
			age = uint32((now.UnixNano() - e.stored) / int64(time.Second))
		} else {
			if !s.fwd.usable() {
				resp.Rcode = mdns.RcodeServerFailure
				break
			}
			cctx, cancel := context.WithTimeout(ctx, 2*s.cfg.UpstreamTimeout)
			var err error
			e, err = s.fwd.resolve(cctx, string(w.key), fq)
			cancel()
			if err != nil {
				resp.Rcode = mdns.RcodeServerFailure
				break
			}
		}
		r := new(mdns.Msg)
		if err := r.Unpack(e.wire); err != nil {
			resp.Rcode = mdns.RcodeServerFailure
			break
		}
		for _, rr := range append(r.Answer, r.Ns...) {
			if h := rr.Header(); h.Ttl > age {
				h.Ttl -= age
			} else {
				h.Ttl = 0
			}
		}
		resp.Answer = append(resp.Answer, r.Answer...)
		resp.Rcode = r.Rcode
		if len(r.Answer) == 0 {
			resp.Ns = r.Ns
		}
		break
	}
	wire, err := resp.Pack()
	if err != nil {
		return s.errorResponse(w.out, q, req, mdns.RcodeServerFailure, true)
	}
	return s.emit(w.out, wire, nil, q, req, limit, 0, nil)
}

// soaRR is the cluster zone's SOA (slow path).
func (s *Server) soaRR() mdns.RR {
	m := new(mdns.Msg)
	n := s.idx.get(s.zoneWire)
	if n == nil {
		return nil
	}
	if a := n.answer(mdns.TypeSOA); a != nil && m.Unpack(a.wire) == nil && len(m.Answer) > 0 {
		return m.Answer[0]
	}
	return nil
}
