package dns

import (
	"hash/maphash"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// cache keeps upstream answers, positive and negative, packed and ready to
// send. The key is the lowercased wire question name, the type and the DO/CD
// bits (an answer with DNSSEC records is not one without).
//
// Entries are immutable; a hit copies the packed response and ages its TTLs
// in place (see emit). Eviction is random within a full shard, as in
// CoreDNS's cache: cheap, and good enough when the cap is rarely reached.
type cache struct {
	seed     maphash.Seed
	shards   [cacheShards]cacheShard
	perShard int
	maxTTL   time.Duration
	maxNeg   time.Duration
}

const cacheShards = 16

type cacheShard struct {
	mu sync.RWMutex
	m  map[string]*centry
}

// centry is one cached response.
type centry struct {
	wire    []byte   // packed response, ID 0, no OPT, question lowercased
	ttlOffs []uint16 // where wire's TTLs are
	stored  int64    // unix nanoseconds
	expires int64    // unix nanoseconds
	rcode   int
}

func newCache(size int, maxTTL, maxNeg time.Duration) *cache {
	if size <= 0 {
		return nil
	}
	c := &cache{seed: maphash.MakeSeed(), maxTTL: maxTTL, maxNeg: maxNeg}
	c.perShard = (size + cacheShards - 1) / cacheShards
	for i := range c.shards {
		c.shards[i].m = make(map[string]*centry)
	}
	return c
}

func (c *cache) shard(key []byte) *cacheShard {
	return &c.shards[maphash.Bytes(c.seed, key)%cacheShards]
}

// get returns a live entry for key, without allocating.
func (c *cache) get(key []byte, now int64) *centry {
	if c == nil {
		return nil
	}
	sh := c.shard(key)
	sh.mu.RLock()
	e := sh.m[string(key)]
	sh.mu.RUnlock()
	if e == nil || now >= e.expires {
		return nil
	}
	return e
}

func (c *cache) put(key string, e *centry) {
	if c == nil {
		return
	}
	sh := c.shard([]byte(key))
	sh.mu.Lock()
	if len(sh.m) >= c.perShard {
		if _, ok := sh.m[key]; !ok {
			c.evict(sh, e.stored)
		}
	}
	sh.m[key] = e
	sh.mu.Unlock()
}

// evict removes expired entries met in a short random walk, or else one
// random entry. Called with the shard locked.
func (c *cache) evict(sh *cacheShard, now int64) {
	n := 0
	removed := false
	for k, e := range sh.m {
		if now >= e.expires {
			delete(sh.m, k)
			removed = true
		}
		n++
		if n >= 8 {
			break
		}
	}
	if removed {
		return
	}
	for k := range sh.m {
		delete(sh.m, k)
		return
	}
}

func (c *cache) len() int {
	if c == nil {
		return 0
	}
	n := 0
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.RLock()
		n += len(sh.m)
		sh.mu.RUnlock()
	}
	return n
}

// cacheKey builds the key of a question into buf.
func cacheKey(buf []byte, name []byte, qtype uint16, do, cd bool) []byte {
	buf = append(buf[:0], name...)
	var f byte
	if do {
		f |= 1
	}
	if cd {
		f |= 2
	}
	return append(buf, byte(qtype>>8), byte(qtype), f)
}

// entryFor turns an upstream response into a cache entry: ID 0, question
// lowercased, OPT removed, AA cleared, RA set. cacheFor is how long it may
// be cached (0: not at all, but the entry can still answer this query).
func (c *cache) entryFor(r *mdns.Msg, now time.Time) (e *centry, cacheFor time.Duration, err error) {
	m := r.Copy()
	m.Id = 0
	m.Response = true
	m.Authoritative = false
	m.RecursionAvailable = true
	m.Truncated = false
	m.Compress = true
	if len(m.Question) == 1 {
		m.Question[0].Name = strings.ToLower(m.Question[0].Name)
	}
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != mdns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	m.Extra = extra
	wire, err := m.Pack()
	if err != nil {
		return nil, 0, err
	}
	offs, err := ttlOffsets(wire)
	if err != nil {
		return nil, 0, err
	}
	if c != nil {
		cacheFor = c.ttlFor(m)
	}
	e = &centry{wire: wire, ttlOffs: offs, stored: now.UnixNano(), expires: now.Add(cacheFor).UnixNano(), rcode: m.Rcode}
	return e, cacheFor, nil
}

// ttlFor is how long a response may be cached: the smallest TTL of its
// answer and authority records, capped; for negative answers the SOA's
// negative TTL (RFC 2308 5), capped. Other rcodes are not cached.
func (c *cache) ttlFor(m *mdns.Msg) time.Duration {
	switch m.Rcode {
	case mdns.RcodeSuccess:
		if len(m.Answer) > 0 {
			min := uint32(1<<31 - 1)
			for _, rr := range append(m.Answer[:len(m.Answer):len(m.Answer)], m.Ns...) {
				if t := rr.Header().Ttl; t < min {
					min = t
				}
			}
			return capTTL(min, c.maxTTL)
		}
		return c.negativeTTL(m)
	case mdns.RcodeNameError:
		return c.negativeTTL(m)
	}
	return 0
}

func (c *cache) negativeTTL(m *mdns.Msg) time.Duration {
	for _, rr := range m.Ns {
		if soa, ok := rr.(*mdns.SOA); ok {
			t := soa.Hdr.Ttl
			if soa.Minttl < t {
				t = soa.Minttl
			}
			return capTTL(t, c.maxNeg)
		}
	}
	return 0 // no SOA: nothing says how long the answer holds
}

func capTTL(ttl uint32, max time.Duration) time.Duration {
	d := time.Duration(ttl) * time.Second
	if d > max {
		d = max
	}
	return d
}
