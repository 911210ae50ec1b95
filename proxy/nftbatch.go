package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
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
	text := tx.String()
	if strings.Contains(text, "\n# ERROR: ") || strings.HasPrefix(text, "# ERROR: ") {
		// A transaction that failed to build: knftables reports why.
		return b.Interface.Run(ctx, tx)
	}
	// The regrouped text is written to nft as it is made, not built first:
	// a full sync's is as large as the transaction's text (~10 MB at
	// 10,000 Services), and both at once would add to the sync's peak.
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
	w := bufio.NewWriterSize(stdin, min(len(text), 64<<10))
	mergeElementAdds(w, text)
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
	var prefix string // "add element <family> <table> <name> { " of the open command
	n := 0
	closeCmd := func() {
		if n > 0 {
			out.WriteString(" }\n")
		}
		prefix, n = "", 0
	}
	for line := range strings.Lines(text) {
		line = strings.TrimSuffix(line, "\n")
		p, body, ok := splitElementAdd(line)
		if !ok {
			closeCmd()
			out.WriteString(line)
			out.WriteByte('\n')
			continue
		}
		if p != prefix || n == elementBatch {
			closeCmd()
			prefix = p
			out.WriteString(p)
		} else {
			out.WriteString(", ")
		}
		out.WriteString(body)
		n++
	}
	closeCmd()
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
