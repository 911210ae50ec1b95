package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"
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

// recordingNFT applies to knftables' fake and records the text each Run
// would send to nft (regrouped as batchingNFT regroups it).
type recordingNFT struct {
	*knftables.Fake
	texts []string
}

func (r *recordingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	var out strings.Builder
	mergeElementAdds(&out, tx.String())
	r.texts = append(r.texts, out.String())
	return r.Fake.Run(ctx, tx)
}

// bulkRecordingNFT is recordingNFT that takes a full sync's elements as
// batchingNFT does (bulkRunner), recording what it would send.
type bulkRecordingNFT struct{ recordingNFT }

func (r *bulkRecordingNFT) runBulk(ctx context.Context, head *knftables.Transaction, elems []*element, tail *knftables.Transaction) error {
	var out strings.Builder
	writeBulk(&out, head.String(), elems, tail.String())
	r.texts = append(r.texts, out.String())
	return nil
}

// TestBulkFullSyncSendsTheSameText: a full sync through bulkRunner sends
// nft byte for byte the text of the same sync made of knftables elements.
func TestBulkFullSyncSendsTheSameText(t *testing.T) {
	h := newHarness(t, testConfig(), nil, allShapes()...)
	h.sync()
	plain := &recordingNFT{Fake: knftables.NewFake(knftables.InetFamily, tableName)}
	bulk := &bulkRecordingNFT{recordingNFT{Fake: knftables.NewFake(knftables.InetFamily, tableName)}}
	for _, nft := range []knftables.Interface{plain, bulk} {
		if _, err := newNFTBackend(nft, slog.New(slog.DiscardHandler)).sync(context.Background(), &h.p.st, nil, true); err != nil {
			t.Fatal(err)
		}
	}
	if len(plain.texts) != 2 || len(bulk.texts) != 2 {
		t.Fatalf("transactions: %d and %d, want 2 each", len(plain.texts), len(bulk.texts))
	}
	if !strings.Contains(plain.texts[1], "add element inet knit-proxy endpoints-v4-tcp") {
		t.Fatalf("the full sync's text has no elements:\n%s", plain.texts[1])
	}
	for i := range plain.texts {
		if plain.texts[i] != bulk.texts[i] {
			t.Errorf("transaction %d differs:\n%s", i, lineDiff(plain.texts[i], bulk.texts[i]))
		}
	}
}

// TestWriteBulk: elements written straight from the renders merge with the
// head's trailing additions to the same container, split at elementBatch,
// and carry comments quoted as knftables quotes them.
func TestWriteBulk(t *testing.T) {
	fake := knftables.NewFake(knftables.InetFamily, tableName)
	var elems []*element
	for i := range elementBatch + 3 {
		elems = append(elems, &element{container: "s", key: fmt.Sprintf("10.0.%d.%d", i/256, i%256)})
	}
	elems = append(elems,
		&element{container: "m", key: joinKey("10.43.0.1", "tcp", "80"), value: "goto x"},
		&element{container: "m", key: joinKey("10.43.0.2", "tcp", "80"), value: "drop", comment: `ns/a:"q", }\ é`},
	)
	build := func(withElems bool) (head, tail *knftables.Transaction) {
		head = fake.NewTransaction()
		head.Add(&knftables.Rule{Chain: "c", Rule: "goto x"})
		head.Add(&knftables.Element{Set: "s", Key: []string{"10.9.9.9"}})
		tail = head
		if withElems {
			for _, el := range elems {
				head.Add(el.object())
			}
		} else {
			tail = fake.NewTransaction()
		}
		tail.Delete(&knftables.Map{Name: "old"})
		return head, tail
	}
	whole, _ := build(true)
	var want, got strings.Builder
	mergeElementAdds(&want, whole.String())
	head, tail := build(false)
	writeBulk(&got, head.String(), elems, tail.String())
	if got.String() != want.String() {
		t.Errorf("got\n%s\nwant\n%s", got.String(), want.String())
	}
	if n := strings.Count(want.String(), "add element inet knit-proxy s {"); n != 2 {
		t.Errorf("want the set's additions in 2 commands, got %d", n)
	}
}
