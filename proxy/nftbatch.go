package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"sigs.k8s.io/knftables"
)

// elementBatch is the most elements one merged "add element" command
// carries (nft splits a command into netlink messages of its own size).
const elementBatch = 1000

// batchingNFT runs transactions through the nft binary as knftables does,
// except that consecutive additions of elements to the same set or map
// become one "add element … { e1, e2, … }" command instead of one command
// per element. nft parses, evaluates and sends every command on its own:
// for a full sync of 10,000 Services x 10 endpoints (120,000 elements) one
// command per element cost 1.75 s of nft's CPU, merged 1.13 s (nft 1.0.6,
// kernel 6.18). The transaction is still one knftables.Transaction, applied
// atomically by one nft process; only its text is regrouped, in order.
// Everything else (listing, checks) is knftables' own.
type batchingNFT struct {
	knftables.Interface
	path string
}

func newBatchingNFT(nft knftables.Interface) (knftables.Interface, error) {
	path, err := exec.LookPath("nft")
	if err != nil {
		return nil, err
	}
	return &batchingNFT{Interface: nft, path: path}, nil
}

// Run implements knftables.Interface.
func (b *batchingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	return b.runBulk(ctx, tx, nil, nil)
}

// bulkRunner runs a transaction made of head's operations, then the
// addition of elems, then tail's operations (nil: none), in one nft run:
// one atomic transaction, without a knftables.Element per element (a full
// sync of 10,000 Services adds 110,000 elements; as knftables elements and
// their text they were most of the sync's peak memory).
type bulkRunner interface {
	runBulk(ctx context.Context, head *knftables.Transaction, elems []*element, tail *knftables.Transaction) error
}

func (b *batchingNFT) runBulk(ctx context.Context, head *knftables.Transaction, elems []*element, tail *knftables.Transaction) error {
	text, tailText := head.String(), ""
	if tail != nil {
		tailText = tail.String()
	}
	// A transaction that failed to build: knftables reports why.
	if hasError(text) {
		return b.Interface.Run(ctx, head)
	}
	if hasError(tailText) {
		return b.Interface.Run(ctx, tail)
	}
	// The regrouped text is written to nft as it is made, not built first:
	// a full sync's is ~10 MB at 10,000 Services, and both at once would
	// add to the sync's peak.
	cmd := exec.CommandContext(ctx, b.path, "-f", "-")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return fmt.Errorf("nft: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("nft: %w", err)
	}
	w := bufio.NewWriterSize(stdin, min(len(text)+len(tailText)+100*len(elems), 64<<10))
	writeBulk(w, text, elems, tailText)
	werr := w.Flush()
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	if werr != nil {
		// nft exited 0 without reading everything: not applied as sent.
		return fmt.Errorf("nft: writing the transaction: %w", werr)
	}
	return nil
}

func hasError(text string) bool {
	return strings.Contains(text, "\n# ERROR: ") || strings.HasPrefix(text, "# ERROR: ")
}

// writeBulk writes head, the addition of elems and tail as nft commands,
// regrouped: byte for byte what mergeElementAdds makes of one transaction
// holding head's operations, elems as knftables elements, then tail's.
func writeBulk(w textWriter, head string, elems []*element, tail string) {
	m := merger{out: w}
	m.text(head)
	var container, prefix string
	for _, el := range elems {
		if el.container != container {
			container, prefix = el.container, elementPrefix(el.container)
		}
		m.add(prefix, el)
	}
	m.text(tail)
	m.close()
}

// elementPrefix is the start of a command that adds elements to container.
func elementPrefix(container string) string {
	return "add element " + string(knftables.InetFamily) + " " + tableName + " " + container + " { "
}

// textWriter is what mergeElementAdds writes to (a bufio.Writer, whose
// errors stick until Flush, or a strings.Builder).
type textWriter interface {
	WriteString(s string) (int, error)
	WriteByte(c byte) error
}

// mergeElementAdds rewrites consecutive lines
//
//	add element inet t m { k1 : v1 }
//	add element inet t m { k2 : v2 }
//
// as "add element inet t m { k1 : v1, k2 : v2 }", up to elementBatch
// elements per command. Other lines, and their order, are kept.
func mergeElementAdds(out textWriter, text string) {
	m := merger{out: out}
	m.text(text)
	m.close()
}

// merger writes nft commands, merging consecutive element additions to
// one container (see mergeElementAdds).
type merger struct {
	out    textWriter
	prefix string // "add element <family> <table> <name> { " of the open command
	n      int
}

// text writes the commands of a transaction's text.
func (m *merger) text(text string) {
	for line := range strings.Lines(text) {
		line = strings.TrimSuffix(line, "\n")
		p, body, ok := splitElementAdd(line)
		if !ok {
			m.close()
			m.out.WriteString(line)
			m.out.WriteByte('\n')
			continue
		}
		m.open(p)
		m.out.WriteString(body)
	}
}

// add writes the addition of el (as knftables writes an element: key,
// comment, value) to the command prefix opens.
func (m *merger) add(prefix string, el *element) {
	m.open(prefix)
	m.out.WriteString(el.key)
	if el.comment != "" {
		m.out.WriteString(" comment ")
		m.out.WriteString(strconv.Quote(el.comment))
	}
	if el.value != "" {
		m.out.WriteString(" : ")
		m.out.WriteString(el.value)
	}
}

// open continues the open command with one more element if it has prefix
// and room, else starts one.
func (m *merger) open(prefix string) {
	if prefix != m.prefix || m.n == elementBatch {
		m.close()
		m.prefix = prefix
		m.out.WriteString(prefix)
	} else {
		m.out.WriteString(", ")
	}
	m.n++
}

// close ends the open command, if any.
func (m *merger) close() {
	if m.n > 0 {
		m.out.WriteString(" }\n")
	}
	m.prefix, m.n = "", 0
}

// splitElementAdd splits "add element <family> <table> <name> { <body> }"
// into its prefix (up to and including "{ ") and body. Names cannot hold
// spaces or braces, so the first " { " ends the prefix.
func splitElementAdd(line string) (prefix, body string, ok bool) {
	if !strings.HasPrefix(line, "add element ") || !strings.HasSuffix(line, " }") {
		return "", "", false
	}
	i := strings.Index(line, " { ")
	if i < 0 || strings.Count(line[:i], " ") != 4 {
		return "", "", false
	}
	return line[:i+3], line[i+3 : len(line)-2], true
}
