package ipam

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"testing"
	"time"
)

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func req(id string) Request {
	return Request{Attachment: Attachment{ContainerID: id, IfName: "eth0"}, Now: t0}
}

func TestPoolBounds(t *testing.T) {
	for _, tc := range []struct {
		pool              string
		gw, first, last   string
		size              uint64
		validationFailure bool
	}{
		{pool: "10.42.1.0/24", gw: "10.42.1.1", first: "10.42.1.2", last: "10.42.1.254", size: 253},
		{pool: "10.42.0.0/16", gw: "10.42.0.1", first: "10.42.0.2", last: "10.42.255.254", size: 65533},
		{pool: "10.42.1.0/30", gw: "10.42.1.1", first: "10.42.1.2", last: "10.42.1.2", size: 1},
		{pool: "fd42:0:0:1::/64", gw: "fd42:0:0:1::1", first: "fd42:0:0:1::2", last: "fd42::1:ffff:ffff:ffff:ffff", size: math.MaxUint64 - 1},
		{pool: "fd42::/120", gw: "fd42::1", first: "fd42::2", last: "fd42::ff", size: 254},
		{pool: "fd42::/48", gw: "fd42::1", first: "fd42::2", last: "fd42::ffff:ffff:ffff:ffff:ffff", size: math.MaxUint64},
		{pool: "10.42.1.0/31", validationFailure: true},
		{pool: "10.42.1.1/24", validationFailure: true},
		{pool: "fd42::/127", validationFailure: true},
	} {
		t.Run(tc.pool, func(t *testing.T) {
			p := pfx(tc.pool)
			err := ValidatePool(p)
			if tc.validationFailure {
				if err == nil {
					t.Fatalf("ValidatePool(%s) = nil, want error", p)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := Gateway(p); got != addr(tc.gw) {
				t.Errorf("Gateway = %s, want %s", got, tc.gw)
			}
			if got := firstHost(p); got != addr(tc.first) {
				t.Errorf("firstHost = %s, want %s", got, tc.first)
			}
			if got := lastHost(p); got != addr(tc.last) {
				t.Errorf("lastHost = %s, want %s", got, tc.last)
			}
			if got := PoolSize(p); got != tc.size {
				t.Errorf("PoolSize = %d, want %d", got, tc.size)
			}
		})
	}
}

func TestAllocateSkipsReservedAndRoundRobins(t *testing.T) {
	st := &State{Version: stateVersion}
	pool := []netip.Prefix{pfx("10.42.1.0/29")} // .2 .. .6
	var got []string
	for i := range 5 {
		r, err := st.Allocate(req(fmt.Sprint("c", i)), pool)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, r.IPs[0].String())
	}
	want := "[10.42.1.2 10.42.1.3 10.42.1.4 10.42.1.5 10.42.1.6]"
	if fmt.Sprint(got) != want {
		t.Fatalf("allocated %v, want %s", got, want)
	}
	if _, err := st.Allocate(req("full"), pool); !IsExhausted(err) {
		t.Fatalf("allocate from a full pool: %v, want ExhaustedError", err)
	}
	// Release .3 then .5: the next allocation wraps and finds .3 first,
	// proving the cursor (at .6) was not moved back by the releases.
	st.Release(Attachment{"c1", "eth0"})
	st.Release(Attachment{"c3", "eth0"})
	r, err := st.Allocate(req("n1"), pool)
	if err != nil || r.IPs[0] != addr("10.42.1.3") {
		t.Fatalf("after wrap got %v, %v; want 10.42.1.3", r.IPs, err)
	}
	r, err = st.Allocate(req("n2"), pool)
	if err != nil || r.IPs[0] != addr("10.42.1.5") {
		t.Fatalf("got %v, %v; want 10.42.1.5", r.IPs, err)
	}
}

func TestNoImmediateReuse(t *testing.T) {
	st := &State{Version: stateVersion}
	pool := []netip.Prefix{pfx("10.42.1.0/24")}
	first, _ := st.Allocate(req("a"), pool)
	st.Release(first.Attachment)
	second, _ := st.Allocate(req("b"), pool)
	if second.IPs[0] == first.IPs[0] {
		t.Fatalf("released %s was handed out again at once", first.IPs[0])
	}
}

func TestAllocateDualStackAndIdempotent(t *testing.T) {
	st := &State{Version: stateVersion}
	pools := []netip.Prefix{pfx("10.42.1.0/24"), pfx("fd42:0:0:1::/64")}
	r1, err := st.Allocate(req("a"), pools)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(r1.IPs) != "[10.42.1.2 fd42:0:0:1::2]" {
		t.Fatalf("IPs = %v", r1.IPs)
	}
	again := req("a")
	again.Netns = "/run/netns/x"
	r2, err := st.Allocate(again, pools)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(r2.IPs) != fmt.Sprint(r1.IPs) || r2.Netns != "/run/netns/x" || len(st.Reservations) != 1 {
		t.Fatalf("retried ADD: %+v, %d reservations", r2, len(st.Reservations))
	}
	// The node's podCIDR changed: the old reservation is replaced.
	r3, err := st.Allocate(req("a"), []netip.Prefix{pfx("10.42.7.0/24")})
	if err != nil || r3.IPs[0] != addr("10.42.7.2") || len(st.Reservations) != 1 {
		t.Fatalf("after CIDR change: %v %v (%d reservations)", r3.IPs, err, len(st.Reservations))
	}
	if _, ok := st.Last[pfx("10.42.1.0/24")]; ok {
		t.Errorf("cursor of the old pool kept: %v", st.Last)
	}
}

func TestExhaustionLeavesStateUntouched(t *testing.T) {
	st := &State{Version: stateVersion}
	pools := []netip.Prefix{pfx("fd42::/64"), pfx("10.42.1.0/30")}
	if _, err := st.Allocate(req("a"), pools); err != nil {
		t.Fatal(err)
	}
	before := fmt.Sprint(st.Last)
	_, err := st.Allocate(req("b"), pools)
	var ex *ExhaustedError
	if !errors.As(err, &ex) || ex.Pool != pfx("10.42.1.0/30") || ex.Size != 1 {
		t.Fatalf("err = %v", err)
	}
	if fmt.Sprint(st.Last) != before || len(st.Reservations) != 1 {
		t.Fatalf("failed allocation changed state: %v, %d reservations", st.Last, len(st.Reservations))
	}
}

func TestRetain(t *testing.T) {
	st := &State{Version: stateVersion}
	pool := []netip.Prefix{pfx("10.42.1.0/24")}
	for _, id := range []string{"d", "e", "f"} {
		if _, err := st.Allocate(req(id), pool); err != nil {
			t.Fatal(err)
		}
	}
	released := st.Retain(func(r Reservation) bool { return r.ContainerID == "e" })
	if len(released) != 2 || st.Find(Attachment{"e", "eth0"}) == nil || len(st.Reservations) != 1 {
		t.Fatalf("Retain released %v, kept %v", released, st.Reservations)
	}
	if st.Used(pool[0]) != 1 {
		t.Fatalf("Used = %d", st.Used(pool[0]))
	}
}

func TestAllocateRejectsBadInput(t *testing.T) {
	st := &State{Version: stateVersion}
	for name, tc := range map[string]struct {
		r     Request
		pools []netip.Prefix
	}{
		"no container":  {Request{Attachment: Attachment{IfName: "eth0"}}, []netip.Prefix{pfx("10.0.0.0/24")}},
		"no pools":      {req("a"), nil},
		"tiny pool":     {req("a"), []netip.Prefix{pfx("10.0.0.0/31")}},
		"unmasked pool": {req("a"), []netip.Prefix{pfx("10.0.0.9/24")}},
	} {
		if _, err := st.Allocate(tc.r, tc.pools); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
