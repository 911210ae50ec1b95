package dns

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"
)

// Config holds the DNS component's settings. Zero values are replaced by the
// defaults of DefaultConfig, except the booleans and the CIDR lists.
type Config struct {
	// ClusterDomain is the zone answered from the cluster cache
	// (default "cluster.local").
	ClusterDomain string

	// ListenAddrs are the addresses served, UDP and TCP on each (default
	// 10.43.0.10:53, the cluster DNS Service IP). Port 0 picks a free
	// port, the same for UDP and TCP (see Server.Bound). An unspecified address
	// (0.0.0.0, ::) works but is served through github.com/miekg/dns's
	// own UDP loop, which is slower than the fast path used for specific
	// addresses.
	ListenAddrs []netip.AddrPort

	// RestartGuard installs the nftables table knit-dns, which drops (rather
	// than refuses) queries to the served addresses while nothing is bound
	// to them, so that clients retry across an agent restart (guard.go). On
	// in DefaultConfig; off in the zero Config, so tests touch no firewall.
	RestartGuard bool

	// BindLocalIP makes Run put LocalIPs on the dummy link "knit-dns0"
	// (idempotent; never removed) so that the kernel delivers packets for
	// the cluster DNS Service IP to this node's socket. See the package
	// documentation.
	BindLocalIP bool
	// LocalIPs are the addresses BindLocalIP adds, as /32 or /128.
	// Default: the ListenAddrs inside ServiceCIDRs. They are also the
	// addresses of the zone's name server record (ns.dns.<zone>).
	LocalIPs []netip.Addr

	// Upstreams are the resolvers everything outside the cluster zones is
	// forwarded to, "ip" or "ip:port". Empty: the nameservers of
	// ResolvConf (see ReadResolvConf for the systemd-resolved case).
	Upstreams []string
	// ResolvConf is read when Upstreams is empty (default /etc/resolv.conf).
	ResolvConf string

	// ServiceCIDRs and ClusterCIDRs are the reverse zones answered
	// authoritatively (PTR of ClusterIPs and headless endpoints); reverse
	// names outside them are forwarded.
	ServiceCIDRs []netip.Prefix
	ClusterCIDRs []netip.Prefix

	// TTL of cluster records and of the cluster zone's negative answers
	// (default 5s, as CoreDNS).
	TTL time.Duration

	// CacheSize is the number of forwarded answers kept (default 10000;
	// negative disables the cache).
	CacheSize int
	// CacheMaxTTL caps how long a positive upstream answer is cached
	// (default 1h); CacheMaxNegativeTTL the same for NXDOMAIN/NODATA
	// (default 5m). Shorter record TTLs are always honoured.
	CacheMaxTTL         time.Duration
	CacheMaxNegativeTTL time.Duration

	// MaxConcurrentForwards bounds the queries waiting on upstreams at
	// once; beyond it queries get SERVFAIL at once (default 1000).
	MaxConcurrentForwards int
	// UpstreamTimeout bounds one attempt at one upstream (default 2s).
	UpstreamTimeout time.Duration

	// UDPSize is the EDNS payload size advertised and the largest UDP
	// response sent (default 1232, the DNS flag day 2020 value).
	UDPSize int

	// ResyncPeriod is how often every record is rebuilt from the cache
	// even without events (default 5m).
	ResyncPeriod time.Duration
}

// Name of the link BindLocalIP creates.
const LocalLinkName = "knit-dns0"

// DefaultConfig returns the settings used for zero-valued fields.
func DefaultConfig() Config {
	return Config{
		ClusterDomain:         "cluster.local",
		ListenAddrs:           []netip.AddrPort{netip.MustParseAddrPort("10.43.0.10:53")},
		ResolvConf:            "/etc/resolv.conf",
		TTL:                   5 * time.Second,
		CacheSize:             10000,
		CacheMaxTTL:           time.Hour,
		CacheMaxNegativeTTL:   5 * time.Minute,
		MaxConcurrentForwards: 1000,
		UpstreamTimeout:       2 * time.Second,
		UDPSize:               1232,
		ResyncPeriod:          5 * time.Minute,
		RestartGuard:          true,
	}
}

// withDefaults fills zero fields and checks the rest.
func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig()
	if c.ClusterDomain == "" {
		c.ClusterDomain = d.ClusterDomain
	}
	c.ClusterDomain = strings.ToLower(strings.Trim(c.ClusterDomain, "."))
	if c.ClusterDomain == "" {
		return c, errors.New("cluster domain must not be the root")
	}
	if len(c.ListenAddrs) == 0 {
		c.ListenAddrs = d.ListenAddrs
	}
	if c.ResolvConf == "" {
		c.ResolvConf = d.ResolvConf
	}
	if c.TTL <= 0 {
		c.TTL = d.TTL
	}
	if c.CacheSize == 0 {
		c.CacheSize = d.CacheSize
	}
	if c.CacheMaxTTL <= 0 {
		c.CacheMaxTTL = d.CacheMaxTTL
	}
	if c.CacheMaxNegativeTTL <= 0 {
		c.CacheMaxNegativeTTL = d.CacheMaxNegativeTTL
	}
	if c.MaxConcurrentForwards <= 0 {
		c.MaxConcurrentForwards = d.MaxConcurrentForwards
	}
	if c.UpstreamTimeout <= 0 {
		c.UpstreamTimeout = d.UpstreamTimeout
	}
	if c.UDPSize <= 0 {
		c.UDPSize = d.UDPSize
	}
	if c.UDPSize < minUDP {
		c.UDPSize = minUDP
	}
	if c.UDPSize > 65535 {
		c.UDPSize = 65535
	}
	if c.ResyncPeriod <= 0 {
		c.ResyncPeriod = d.ResyncPeriod
	}
	for _, ap := range c.ListenAddrs {
		if !ap.IsValid() {
			return c, fmt.Errorf("listen address %v: need an address and a port", ap)
		}
	}
	if len(c.LocalIPs) == 0 {
		for _, ap := range c.ListenAddrs {
			for _, p := range c.ServiceCIDRs {
				if p.Contains(ap.Addr().Unmap()) {
					c.LocalIPs = append(c.LocalIPs, ap.Addr().Unmap())
					break
				}
			}
		}
	}
	if c.BindLocalIP && len(c.LocalIPs) == 0 {
		return c, errors.New("BindLocalIP: no listen address inside the service CIDRs; set LocalIPs")
	}
	return c, nil
}

// ReadResolvConf returns the nameservers of a resolv.conf file as "ip:53".
//
// The systemd-resolved trap (coredns issue #2087): on such nodes
// /etc/resolv.conf names only the local stub 127.0.0.53. Forwarding there
// works only as long as resolved itself does not send the query back to the
// cluster DNS address, and it adds a hop; kubelet's advice is to read
// /run/systemd/resolve/resolv.conf, which lists the real upstreams. When path
// names nothing but loopback stubs and that file exists, it is read instead
// and the returned note says so.
func ReadResolvConf(path string) (servers []string, note string, err error) {
	servers, err = readNameservers(path)
	if err != nil {
		return nil, "", err
	}
	allLoopback := len(servers) > 0
	for _, s := range servers {
		ap, err := netip.ParseAddrPort(s)
		if err != nil || !ap.Addr().IsLoopback() {
			allLoopback = false
		}
	}
	if allLoopback && path != resolvedConf {
		if alt, err := readNameservers(resolvedConf); err == nil && len(alt) > 0 {
			return alt, fmt.Sprintf("%s names only the loopback stub %v; using %s instead", path, servers, resolvedConf), nil
		}
	}
	return servers, "", nil
}

// resolvedConf is where systemd-resolved lists the real upstreams (a
// variable for tests).
var resolvedConf = "/run/systemd/resolve/resolv.conf"

func readNameservers(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseNameservers(f)
}

func parseNameservers(r io.Reader) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		// Zones in link-local v6 addresses ("fe80::1%eth0") are kept by
		// ParseAddr.
		a, err := netip.ParseAddr(f[1])
		if err != nil {
			continue
		}
		out = append(out, netip.AddrPortFrom(a, 53).String())
	}
	return out, sc.Err()
}

// parseUpstream accepts "ip" or "ip:port".
func parseUpstream(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	a, err := netip.ParseAddr(strings.Trim(s, "[]"))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("upstream %q: want ip or ip:port", s)
	}
	return netip.AddrPortFrom(a, 53), nil
}
