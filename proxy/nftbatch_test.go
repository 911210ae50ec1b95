package proxy

import (
	"fmt"
	"strings"
	"testing"
)

func TestMergeElementAdds(t *testing.T) {
	many := func(n int) (in, want string) {
		var b, w strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "add element inet t s { 10.0.0.%d }\n", i)
		}
		for i := range n {
			switch {
			case i%elementBatch == 0 && i > 0:
				w.WriteString(" }\nadd element inet t s { ")
			case i == 0:
				w.WriteString("add element inet t s { ")
			default:
				w.WriteString(", ")
			}
			fmt.Fprintf(&w, "10.0.0.%d", i)
		}
		w.WriteString(" }\n")
		return b.String(), w.String()
	}
	bigIn, bigWant := many(elementBatch + 2)
	for _, tc := range []struct{ name, in, want string }{
		{"nothing to merge",
			"add table inet t\nflush map inet t m\nadd rule inet t c goto x\n",
			"add table inet t\nflush map inet t m\nadd rule inet t c goto x\n"},
		{"consecutive adds to one map, with comments and verdicts",
			"add element inet t m { 10.43.0.1 . tcp . 80 : goto pick-v4-tcp-2 }\n" +
				"add element inet t m { 10.43.0.2 . tcp . 80 comment \"ns/a: x, }\" : drop }\n" +
				"add element inet t n { 1 . 2 }\n",
			"add element inet t m { 10.43.0.1 . tcp . 80 : goto pick-v4-tcp-2, 10.43.0.2 . tcp . 80 comment \"ns/a: x, }\" : drop }\n" +
				"add element inet t n { 1 . 2 }\n"},
		{"order kept: another command ends a batch",
			"add element inet t s { a }\ndelete element inet t s { b }\nadd element inet t s { c }\n",
			"add element inet t s { a }\ndelete element inet t s { b }\nadd element inet t s { c }\n"},
		{"at most elementBatch per command", bigIn, bigWant},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out strings.Builder
			mergeElementAdds(&out, tc.in)
			if got := out.String(); got != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}
