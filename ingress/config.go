package ingress

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	netinformers "k8s.io/client-go/informers/networking/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Annotations knit reads.
const (
	// AnnotationSSLRedirect on an Ingress ("true") makes its hosts answer
	// plain-HTTP requests with a 308 to https.
	AnnotationSSLRedirect = "knit.dev/ssl-redirect"
	// annotationDefaultClass marks an IngressClass as the cluster default.
	annotationDefaultClass = "ingressclass.kubernetes.io/is-default-class"
	// annotationLegacyClass is the pre-IngressClass way to pick a class.
	annotationLegacyClass = "kubernetes.io/ingress.class"
	// appProtocolH2C is the Service port appProtocol for HTTP/2 without TLS.
	appProtocolH2C = "kubernetes.io/h2c"
)

// Config holds the ingress settings. Start from DefaultConfig; in a zero
// Config every limit and timeout left at zero takes its default, but the
// listen addresses stay empty, and an empty address is a disabled listener.
type Config struct {
	// ControllerName is the spec.controller of the IngressClasses knit
	// serves. Default "knit.dev/ingress".
	ControllerName string
	// HTTPAddr and HTTPSAddr are the listen addresses (DefaultConfig: ":80"
	// and ":443"); empty disables the listener.
	HTTPAddr, HTTPSAddr string
	// NodeName identifies this agent in the status Lease and in Events.
	NodeName string
	// NodeIPs are written to status.loadBalancer.ingress unless
	// StatusFromService is set or Sources.Nodes lists every node's.
	NodeIPs []netip.Addr
	// StatusFromService ("namespace/name", optional) copies that Service's
	// load-balancer addresses (or external IPs) into Ingress status instead.
	StatusFromService string
	// LeaseNamespace and LeaseName name the Lease that elects the one agent
	// writing Ingress status and Events. Defaults "kube-system" and
	// "knit-ingress-status".
	LeaseNamespace, LeaseName string
	// AccessLog turns on one structured log line per request.
	AccessLog bool
	// WatchIngressWithoutClass also serves Ingresses that name no class
	// when none of knit's classes is the default.
	WatchIngressWithoutClass bool
	// DefaultBackend ("namespace/name:port", port by number or name,
	// optional) answers requests no Ingress rule or defaultBackend takes.
	DefaultBackend string

	// MaxHeaderBytes bounds a request head (default 32 KiB) and
	// MaxHeaderCount its fields (default 100); beyond either: 431.
	MaxHeaderBytes int
	MaxHeaderCount int
	// MaxBodyBytes bounds request bodies (0: unlimited); beyond it: 413.
	MaxBodyBytes int64
	// ReadHeaderTimeout bounds reading a request head once its first byte
	// arrived (default 10s): slowloris protection.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes client keep-alive connections idle this long
	// (default 75s).
	IdleTimeout time.Duration
	// WriteTimeout bounds each write to a client (default 60s).
	WriteTimeout time.Duration
	// ConnectTimeout bounds dialing an endpoint (default 5s).
	ConnectTimeout time.Duration
	// UpstreamReadTimeout bounds the wait for a response head and each
	// later read from an endpoint (default 60s, like nginx's
	// proxy_read_timeout).
	UpstreamReadTimeout time.Duration
	// UpstreamIdleTimeout closes pooled endpoint connections idle this long
	// (default 30s).
	UpstreamIdleTimeout time.Duration
	// MaxIdlePerEndpoint bounds pooled connections per endpoint (default 128).
	MaxIdlePerEndpoint int
	// Retries is how many other endpoints a request may be retried on when
	// its connection fails before anything was sent (default 2).
	Retries int
	// EjectAfter consecutive connection failures eject an endpoint for
	// EjectFor (defaults 3 and 10s).
	EjectAfter int
	EjectFor   time.Duration
	// RestartGuard installs the nftables table that makes a new connection
	// wait for the next ingress (its SYN is dropped, and the client's TCP
	// retries it) instead of being refused while the agent restarts; see
	// guard.go. DefaultConfig turns it on; a zero Config touches no
	// firewall.
	RestartGuard bool
	// ShutdownGrace is how long in-flight requests may finish after the
	// context ends (default 5s).
	ShutdownGrace time.Duration
	// MinSyncInterval rate-limits routing-table rebuilds (default 100ms);
	// ResyncInterval forces one regardless of events (default 5m).
	MinSyncInterval time.Duration
	ResyncInterval  time.Duration
}

// DefaultConfig is the configuration of a node's ingress.
func DefaultConfig() Config {
	c := Config{HTTPAddr: ":80", HTTPSAddr: ":443", RestartGuard: true}
	c.setDefaults()
	return c
}

func (c *Config) setDefaults() {
	def := func(p *time.Duration, v time.Duration) {
		if *p <= 0 {
			*p = v
		}
	}
	defInt := func(p *int, v int) {
		if *p <= 0 {
			*p = v
		}
	}
	if c.ControllerName == "" {
		c.ControllerName = "knit.dev/ingress"
	}
	if c.LeaseNamespace == "" {
		c.LeaseNamespace = "kube-system"
	}
	if c.LeaseName == "" {
		c.LeaseName = "knit-ingress-status"
	}
	defInt(&c.MaxHeaderBytes, 32<<10)
	defInt(&c.MaxHeaderCount, 100)
	def(&c.ReadHeaderTimeout, 10*time.Second)
	def(&c.IdleTimeout, 75*time.Second)
	def(&c.WriteTimeout, 60*time.Second)
	def(&c.ConnectTimeout, 5*time.Second)
	def(&c.UpstreamReadTimeout, 60*time.Second)
	def(&c.UpstreamIdleTimeout, 30*time.Second)
	defInt(&c.MaxIdlePerEndpoint, 128)
	if c.Retries < 0 {
		c.Retries = 0
	} else if c.Retries == 0 {
		c.Retries = 2
	}
	if c.Retries > maxTries-1 {
		c.Retries = maxTries - 1
	}
	defInt(&c.EjectAfter, 3)
	def(&c.EjectFor, 10*time.Second)
	def(&c.ShutdownGrace, 5*time.Second)
	def(&c.MinSyncInterval, 100*time.Millisecond)
	def(&c.ResyncInterval, 5*time.Minute)
}

func (c *Config) validate() error {
	if c.StatusFromService != "" {
		if _, _, err := splitNamespaced(c.StatusFromService); err != nil {
			return fmt.Errorf("StatusFromService: %w", err)
		}
	}
	if c.DefaultBackend != "" {
		if _, err := parseServiceRef(c.DefaultBackend); err != nil {
			return fmt.Errorf("DefaultBackend: %w", err)
		}
	}
	for _, a := range []string{c.HTTPAddr, c.HTTPSAddr} {
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("listen address %q: %w", a, err)
		}
	}
	if c.HTTPAddr != "" && c.HTTPAddr == c.HTTPSAddr && !strings.HasSuffix(c.HTTPAddr, ":0") {
		return fmt.Errorf("HTTPAddr and HTTPSAddr are both %q", c.HTTPAddr)
	}
	return nil
}

// Sources are the informers the ingress reads, and the client it writes
// Ingress status, Events and its Lease with.
type Sources struct {
	Ingresses      netinformers.IngressInformer
	IngressClasses netinformers.IngressClassInformer
	Services       coreinformers.ServiceInformer
	EndpointSlices discoveryinformers.EndpointSliceInformer
	// Secrets holds kubernetes.io/tls Secrets only (cluster.Cache.TLSSecrets).
	Secrets cache.SharedIndexInformer
	// Client writes status, Events and the Lease; nil disables all three.
	Client kubernetes.Interface
	// Nodes (optional) lists the nodes whose addresses go into Ingress
	// status: every node's agent serves the ingress. Without it status
	// holds Config.NodeIPs, the writer's own addresses.
	Nodes coreinformers.NodeInformer
}

// settings is the part of Config the data plane reads, in the form it
// reads it.
type settings struct {
	limits
	maxBodyBytes        int64
	readHeaderTimeout   time.Duration
	idleTimeout         time.Duration
	writeTimeout        time.Duration
	connectTimeout      time.Duration
	upstreamReadTimeout time.Duration
	upstreamIdleTimeout time.Duration
	maxIdlePerEndpoint  int
	retries             int
	ejectAfter          int
	ejectFor            time.Duration
	accessLog           bool
	httpsPort           string // "" when 443: left out of redirects
}

func newSettings(c *Config) *settings {
	s := &settings{
		limits:              limits{maxHeaderBytes: c.MaxHeaderBytes, maxHeaderCount: c.MaxHeaderCount},
		maxBodyBytes:        c.MaxBodyBytes,
		readHeaderTimeout:   c.ReadHeaderTimeout,
		idleTimeout:         c.IdleTimeout,
		writeTimeout:        c.WriteTimeout,
		connectTimeout:      c.ConnectTimeout,
		upstreamReadTimeout: c.UpstreamReadTimeout,
		upstreamIdleTimeout: c.UpstreamIdleTimeout,
		maxIdlePerEndpoint:  c.MaxIdlePerEndpoint,
		retries:             c.Retries,
		ejectAfter:          c.EjectAfter,
		ejectFor:            c.EjectFor,
		accessLog:           c.AccessLog,
	}
	if c.HTTPSAddr != "" {
		if _, p, err := net.SplitHostPort(c.HTTPSAddr); err == nil && p != "443" && p != "0" {
			s.httpsPort = p
		}
	}
	return s
}

// serviceRef is "namespace/name:port".
type serviceRef struct {
	namespace, name string
	portName        string
	portNumber      int32
}

func parseServiceRef(s string) (serviceRef, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return serviceRef{}, fmt.Errorf("%q: want namespace/name:port", s)
	}
	ns, name, err := splitNamespaced(s[:i])
	if err != nil {
		return serviceRef{}, err
	}
	r := serviceRef{namespace: ns, name: name}
	port := s[i+1:]
	if n, err := strconv.ParseInt(port, 10, 32); err == nil {
		if n <= 0 || n > 65535 {
			return serviceRef{}, fmt.Errorf("%q: port out of range", s)
		}
		r.portNumber = int32(n)
	} else if port != "" {
		r.portName = port
	} else {
		return serviceRef{}, fmt.Errorf("%q: empty port", s)
	}
	return r, nil
}

func splitNamespaced(s string) (ns, name string, err error) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return "", "", fmt.Errorf("%q: want namespace/name", s)
	}
	return ns, name, nil
}
