package proxy

import (
	"reflect"
	"slices"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// serviceTracker records Service changes between syncs: for each Service the
// state as last applied (previous) and the newest state (current). A change
// that returns a Service to its previous state is dropped, so a sync only
// sees Services that really differ. Event handlers write, the sync goroutine
// checks out.
type serviceTracker struct {
	mu      sync.Mutex
	changes map[types.NamespacedName]*serviceChange
}

type serviceChange struct {
	previous, current *serviceInfo
}

func newServiceTracker() *serviceTracker {
	return &serviceTracker{changes: map[types.NamespacedName]*serviceChange{}}
}

// update records that name's converted state is now current (nil: deleted
// or not proxied). previous is the converted old object, used only when no
// change is pending for name yet.
func (t *serviceTracker) update(name types.NamespacedName, previous, current *serviceInfo) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.changes[name]
	if !ok {
		c = &serviceChange{previous: previous}
		t.changes[name] = c
	}
	c.current = current
	if reflect.DeepEqual(c.previous, c.current) {
		delete(t.changes, name)
		return false
	}
	return true
}

// checkout applies the pending changes to services and returns, for every
// changed Service, its state before (nil if it is new).
func (t *serviceTracker) checkout(services map[types.NamespacedName]*serviceInfo) map[types.NamespacedName]*serviceInfo {
	t.mu.Lock()
	changes := t.changes
	t.changes = map[types.NamespacedName]*serviceChange{}
	t.mu.Unlock()
	before := make(map[types.NamespacedName]*serviceInfo, len(changes))
	for name, c := range changes {
		before[name] = services[name]
		if c.current == nil {
			delete(services, name)
		} else {
			services[name] = c.current
		}
	}
	return before
}

// endpointTracker keeps every EndpointSlice (converted) by Service, as
// applied and as pending, like kube-proxy's EndpointSliceCache: endpoints
// move between slices of one Service, so the endpoint list of a Service is
// always recomputed from all of its slices. A pending slice equal to the
// applied one is dropped.
type endpointTracker struct {
	mu       sync.Mutex
	services map[types.NamespacedName]*sliceSet
	// triggers holds last-change-trigger-times of pending slice updates,
	// for the network programming latency metric.
	triggers []time.Time
	start    time.Time
}

type sliceSet struct {
	applied map[string]*sliceInfo
	pending map[string]*sliceInfo // nil value: slice deleted; empty: nothing to apply
}

func newEndpointTracker(now time.Time) *endpointTracker {
	return &endpointTracker{services: map[types.NamespacedName]*sliceSet{}, start: now}
}

// update records a slice's new state (nil: deleted). trigger is the slice's
// last-change-trigger-time, zero if unknown.
func (t *endpointTracker) update(svc types.NamespacedName, slice string, info *sliceInfo, trigger time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	ss := t.services[svc]
	if ss == nil {
		if info == nil {
			return false
		}
		ss = &sliceSet{applied: map[string]*sliceInfo{}}
		t.services[svc] = ss
	}
	applied, wasApplied := ss.applied[slice]
	if pending, ok := ss.pending[slice]; ok && reflect.DeepEqual(pending, info) {
		return false
	}
	if (wasApplied && reflect.DeepEqual(applied, info)) || (!wasApplied && info == nil) {
		// Back to what is applied: nothing to do for this slice.
		delete(ss.pending, slice)
		return false
	}
	if ss.pending == nil {
		ss.pending = map[string]*sliceInfo{}
	}
	ss.pending[slice] = info
	// Ignore triggers from before we started: they measure the informer's
	// initial list, not programming latency.
	if info != nil && !trigger.IsZero() && trigger.After(t.start) {
		t.triggers = append(t.triggers, trigger)
	}
	return true
}

// has reports whether any slice of svc is known, applied or pending.
func (t *endpointTracker) has(svc types.NamespacedName) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.services[svc] != nil
}

// checkout applies pending slices and writes the resulting endpoint lists of
// every changed Service into endpoints. It returns the changed Services and
// the trigger times collected since the last checkout.
func (t *endpointTracker) checkout(endpoints map[types.NamespacedName]portEndpoints) (map[types.NamespacedName]bool, []time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	changed := map[types.NamespacedName]bool{}
	for svc, ss := range t.services {
		if len(ss.pending) == 0 {
			continue
		}
		for name, info := range ss.pending {
			if info == nil {
				delete(ss.applied, name)
			} else {
				ss.applied[name] = info
			}
		}
		ss.pending = nil // a cleared map would keep its size
		eps := mergeSlices(ss.applied)
		if len(eps) == 0 {
			delete(endpoints, svc)
		} else {
			endpoints[svc] = eps
		}
		if len(ss.applied) == 0 {
			delete(t.services, svc)
		}
		changed[svc] = true
	}
	triggers := t.triggers
	t.triggers = nil
	return changed, triggers
}

// mergeSlices builds the endpoint lists of one Service from its slices. An
// address seen in two slices (a Pod moving between slices, or an IP reused
// while the old Pod terminates) is kept once, preferring the non-terminating
// one. Lists are sorted so that renders are stable.
//
// A Service with one slice (most: a slice holds up to 100 endpoints) shares
// the slice's lists, which convertSlice sorted: the proxy then holds each
// endpoint once. Nothing changes a list once made.
func mergeSlices(applied map[string]*sliceInfo) portEndpoints {
	if len(applied) == 1 {
		for _, s := range applied {
			if out, ok := shareSlice(s); ok {
				return out
			}
		}
	}
	return mergeAll(applied)
}

// mergeAll is mergeSlices for any slices: new lists.
func mergeAll(applied map[string]*sliceInfo) portEndpoints {
	byKey := map[epKey]map[string]endpoint{}
	for _, s := range applied {
		for _, p := range s.ports {
			k := epKey{portKey: p.portKey, family: s.family}
			m := byKey[k]
			if m == nil {
				m = map[string]endpoint{}
				byKey[k] = m
			}
			for _, e := range p.endpoints {
				hp := e.hostPort()
				if old, ok := m[hp]; ok && !old.terminating && e.terminating {
					continue
				}
				m[hp] = e
			}
		}
	}
	out := make(portEndpoints, 0, len(byKey))
	for k, m := range byKey {
		if len(m) == 0 {
			continue
		}
		list := make([]endpoint, 0, len(m))
		for _, e := range m {
			list = append(list, e)
		}
		sortEndpoints(list)
		out = append(out, epList{key: k, eps: list})
	}
	slices.SortFunc(out, func(a, b epList) int { return compareEPKeys(a.key, b.key) })
	return out
}

// shareSlice returns the endpoint lists of a Service's only slice as they
// are, if they are what mergeSlices would build: sorted, no address twice,
// no port twice.
func shareSlice(s *sliceInfo) (portEndpoints, bool) {
	out := make(portEndpoints, 0, len(s.ports))
	for _, p := range s.ports {
		for i := 1; i < len(p.endpoints); i++ {
			if p.endpoints[i-1].addr.Compare(p.endpoints[i].addr) >= 0 {
				return nil, false
			}
		}
		if len(p.endpoints) == 0 {
			continue
		}
		k := epKey{portKey: p.portKey, family: s.family}
		if out.get(k) != nil {
			return nil, false
		}
		out = append(out, epList{key: k, eps: p.endpoints})
	}
	slices.SortFunc(out, func(a, b epList) int { return compareEPKeys(a.key, b.key) })
	return out, true
}

func sortEndpoints(list []endpoint) {
	// Sorted by address then port: the order decides numgen indexes.
	slices.SortFunc(list, func(a, b endpoint) int {
		if c := a.addr.Compare(b.addr); c != 0 {
			return c
		}
		return int(a.port) - int(b.port)
	})
}
