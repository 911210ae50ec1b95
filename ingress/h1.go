package ingress

import (
	"bytes"
	"errors"
	"io"
	"net"
	"time"
)

// This file is the HTTP/1.1 wire format as the fast path reads it: request
// and response heads parsed in place (slices into the connection's read
// buffer, nothing allocated), chunked bodies, and the framing rules of
// RFC 9112 section 6 applied strictly, because a proxy that frames a message
// differently from the server behind it is how request smuggling happens.
// Anything ambiguous is rejected rather than guessed at.

// httpError is a problem with a client's request that ends in a canned
// response. They are package-level values so that rejecting costs nothing.
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

var (
	errBadRequest       = &httpError{400, "malformed request"}
	errBadRequestLine   = &httpError{400, "malformed request line"}
	errBadTarget        = &httpError{400, "invalid request target"}
	errDotSegment       = &httpError{400, "request path contains dot segments"}
	errBadHeader        = &httpError{400, "malformed header field"}
	errBadHost          = &httpError{400, "missing, repeated or invalid Host header"}
	errBadLength        = &httpError{400, "invalid Content-Length"}
	errAmbiguousLength  = &httpError{400, "both Transfer-Encoding and Content-Length, or repeated Transfer-Encoding"}
	errBadChunked       = &httpError{400, "malformed chunked body"}
	errTE10             = &httpError{400, "Transfer-Encoding in an HTTP/1.0 request"}
	errUnsupportedTE    = &httpError{501, "unsupported Transfer-Encoding"}
	errHeadTooLarge     = &httpError{431, "request header fields too large"}
	errTooManyHeaders   = &httpError{431, "too many request header fields"}
	errVersion          = &httpError{505, "HTTP version not supported"}
	errMethodNotAllowed = &httpError{405, "method not supported by this proxy"}
	errBodyTooLarge     = &httpError{413, "request body too large"}
)

// header is one field of a parsed head; both slices point into the read
// buffer and are valid only until the buffer is refilled.
type header struct {
	name, value []byte
	kind        hdrKind
}

// hdrKind classifies the header names the proxy treats specially, once, at
// parse time.
type hdrKind uint8

const (
	hOther hdrKind = iota
	hHost
	hContentLength
	hTransferEncoding
	hConnection
	hKeepAlive
	hProxyConnection
	hUpgrade
	hTE
	hTrailer
	hExpect
	hXForwardedFor
	hXForwardedProto
	hXForwardedHost
	hXRequestID
	hProxyAuthorization
	hProxyAuthenticate
)

// classify maps a header name (any case) to its kind without allocating.
func classify(n []byte) hdrKind {
	switch len(n) {
	case 2:
		if eqFold(n, "te") {
			return hTE
		}
	case 4:
		if eqFold(n, "host") {
			return hHost
		}
	case 6:
		if eqFold(n, "expect") {
			return hExpect
		}
	case 7:
		if eqFold(n, "upgrade") {
			return hUpgrade
		}
		if eqFold(n, "trailer") {
			return hTrailer
		}
	case 10:
		if eqFold(n, "connection") {
			return hConnection
		}
		if eqFold(n, "keep-alive") {
			return hKeepAlive
		}
	case 12:
		if eqFold(n, "x-request-id") {
			return hXRequestID
		}
	case 14:
		if eqFold(n, "content-length") {
			return hContentLength
		}
	case 15:
		if eqFold(n, "x-forwarded-for") {
			return hXForwardedFor
		}
	case 16:
		if eqFold(n, "x-forwarded-host") {
			return hXForwardedHost
		}
		if eqFold(n, "proxy-connection") {
			return hProxyConnection
		}
	case 17:
		if eqFold(n, "transfer-encoding") {
			return hTransferEncoding
		}
		if eqFold(n, "x-forwarded-proto") {
			return hXForwardedProto
		}
	case 18:
		if eqFold(n, "proxy-authenticate") {
			return hProxyAuthenticate
		}
	case 19:
		if eqFold(n, "proxy-authorization") {
			return hProxyAuthorization
		}
	}
	return hOther
}

// eqFold compares b with the lower-case ASCII string s, ignoring b's case.
func eqFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

// eqFoldBytes compares two byte slices ignoring ASCII case.
func eqFoldBytes(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// tchar marks the bytes allowed in a token (RFC 9110 section 5.6.2).
var tchar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// fieldByte marks bytes allowed inside a field value: VCHAR, obs-text, SP, HTAB.
var fieldByte = func() (t [256]bool) {
	for c := 0x20; c < 0x7f; c++ {
		t[c] = true
	}
	for c := 0x80; c <= 0xff; c++ {
		t[c] = true
	}
	t['\t'] = true
	return t
}()

// targetByte marks bytes allowed in a request target: visible ASCII except
// '#' (a fragment is never sent on the wire).
var targetByte = func() (t [256]bool) {
	for c := 0x21; c < 0x7f; c++ {
		t[c] = true
	}
	t['#'] = false
	return t
}()

// hostByte marks bytes allowed in a Host header or authority: registered
// names, IPv4, bracketed IPv6 and a port. Anything else is refused, so no
// odd byte ever reaches a routing decision or an upstream request line.
var hostByte = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range ".-_:[]" {
		t[c] = true
	}
	return t
}()

// findHeadEnd returns the length of the head (through the empty line) in
// b, or -1 if the empty line has not arrived yet. from is where the
// previous, unsuccessful search may resume.
func findHeadEnd(b []byte, from int) int {
	if from > 0 {
		from-- // the previous search may have stopped right after a '\n'
	}
	for i := from; i < len(b); {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		i += j + 1
		if i < len(b) && b[i] == '\n' {
			return i + 1
		}
		if i+1 < len(b) && b[i] == '\r' && b[i+1] == '\n' {
			return i + 2
		}
	}
	return -1
}

// nextLine splits off one line (without its terminator) from b. Lines end
// in CRLF or a bare LF (RFC 9112 section 2.2 lets a recipient accept the
// latter); a bare CR anywhere is an error.
func nextLine(b []byte) (line, rest []byte, ok bool) {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return nil, nil, false
	}
	line, rest = b[:i], b[i+1:]
	if len(line) > 0 && line[len(line)-1] == '\r' {
		line = line[:len(line)-1]
	}
	return line, rest, true
}

// reqHead is a parsed request head. Its slices point into the connection's
// read buffer.
type reqHead struct {
	method    []byte
	target    []byte // as sent
	path      []byte // origin-form path (routing key), without the query
	query     []byte // including the leading '?', or empty
	authority []byte // from an absolute-form target
	host      []byte // effective host: authority if absolute-form, else Host header
	http11    bool
	headers   []header

	contentLength int64 // -1: none
	chunked       bool
	connClose     bool
	connKeepAlive bool
	connUpgrade   bool
	upgrade       []byte
	expect100     bool
	connTokens    [][]byte // other Connection options: headers to drop
	requestID     []byte
	headLen       int
}

func (h *reqHead) reset() {
	hs, ct := h.headers[:0], h.connTokens[:0]
	*h = reqHead{headers: hs, connTokens: ct, contentLength: -1}
}

// hasBody reports whether a message body follows the head.
func (h *reqHead) hasBody() bool { return h.chunked || h.contentLength > 0 }

// isIdempotent is RFC 9110 section 9.2.2's list.
func isIdempotent(m []byte) bool {
	switch string(m) {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	return false
}

type limits struct {
	maxHeaderBytes int
	maxHeaderCount int
}

// parseRequestHead parses head (which ends with the empty line) into h.
func parseRequestHead(head []byte, h *reqHead, lim limits) *httpError {
	h.reset()
	h.headLen = len(head)
	// RFC 9112 section 2.2: ignore empty lines before the request line.
	for len(head) > 0 && (head[0] == '\r' || head[0] == '\n') {
		if head[0] == '\r' && (len(head) < 2 || head[1] != '\n') {
			return errBadRequestLine
		}
		head = head[1:]
	}
	line, rest, ok := nextLine(head)
	if !ok {
		return errBadRequestLine
	}
	if err := parseRequestLine(line, h); err != nil {
		return err
	}
	hostSeen := 0
	teSeen := 0
	clSeen := false
	for {
		line, rest, ok = nextLine(rest)
		if !ok {
			return errBadHeader
		}
		if len(line) == 0 {
			break
		}
		if len(h.headers) >= lim.maxHeaderCount {
			return errTooManyHeaders
		}
		name, value, err := parseField(line)
		if err != nil {
			return err
		}
		k := classify(name)
		h.headers = append(h.headers, header{name: name, value: value, kind: k})
		switch k {
		case hHost:
			hostSeen++
			h.host = value
		case hContentLength:
			n, ok := parseContentLength(value)
			if !ok {
				return errBadLength
			}
			if clSeen && n != h.contentLength {
				return errBadLength
			}
			clSeen = true
			h.contentLength = n
		case hTransferEncoding:
			teSeen++
			if teSeen > 1 {
				return errAmbiguousLength
			}
			if !eqFold(value, "chunked") {
				// Other codings, lists and look-alikes ("xchunked"): a
				// server behind us might read them differently.
				return errUnsupportedTE
			}
			h.chunked = true
		case hConnection:
			if err := h.parseConnection(value); err != nil {
				return err
			}
		case hUpgrade:
			h.upgrade = value
		case hExpect:
			if eqFold(value, "100-continue") {
				h.expect100 = true
			}
		case hXRequestID:
			h.requestID = value
		}
	}
	if h.chunked {
		if !h.http11 {
			return errTE10
		}
		if clSeen {
			return errAmbiguousLength
		}
	}
	if len(h.authority) > 0 {
		h.host = h.authority
	}
	if h.http11 && hostSeen != 1 {
		return errBadHost
	}
	if hostSeen > 1 {
		return errBadHost
	}
	for _, c := range h.host {
		if !hostByte[c] {
			return errBadHost
		}
	}
	if !h.connUpgrade || !h.http11 {
		h.upgrade = nil
	}
	return nil
}

func parseRequestLine(line []byte, h *reqHead) *httpError {
	sp1 := bytes.IndexByte(line, ' ')
	if sp1 <= 0 {
		return errBadRequestLine
	}
	h.method = line[:sp1]
	for _, c := range h.method {
		if !tchar[c] {
			return errBadRequestLine
		}
	}
	rest := line[sp1+1:]
	sp2 := bytes.IndexByte(rest, ' ')
	if sp2 <= 0 {
		return errBadRequestLine
	}
	h.target = rest[:sp2]
	switch proto := rest[sp2+1:]; string(proto) {
	case "HTTP/1.1":
		h.http11 = true
	case "HTTP/1.0":
	default:
		if len(proto) == 8 && string(proto[:5]) == "HTTP/" && proto[6] == '.' &&
			'0' <= proto[5] && proto[5] <= '9' && '0' <= proto[7] && proto[7] <= '9' {
			return errVersion
		}
		return errBadRequestLine
	}
	for _, c := range h.target {
		if !targetByte[c] {
			return errBadTarget
		}
	}
	if string(h.method) == "CONNECT" {
		// Authority-form targets would make this a tunnel to anywhere.
		return errMethodNotAllowed
	}
	t := h.target
	if t[0] != '/' {
		// Absolute-form (RFC 9112 section 3.2.2): the authority replaces the
		// Host header for routing, and only the path travels upstream. The
		// upstream is still chosen by the routing table alone, so this can
		// never be used to reach an arbitrary server.
		var scheme int
		switch {
		case len(t) > 7 && eqFold(t[:7], "http://"):
			scheme = 7
		case len(t) > 8 && eqFold(t[:8], "https://"):
			scheme = 8
		default:
			return errBadTarget // includes the asterisk form
		}
		t = t[scheme:]
		end := len(t)
		for i, c := range t {
			if c == '/' || c == '?' {
				end = i
				break
			}
		}
		h.authority = t[:end]
		if len(h.authority) == 0 || bytes.IndexByte(h.authority, '@') >= 0 {
			return errBadTarget
		}
		t = t[end:]
		if len(t) == 0 {
			t = slash
		} else if t[0] == '?' {
			// "http://host?q" has an empty path; RFC 9112 says send "/?q".
			h.path, h.query = slash, t
			return nil
		}
	}
	if q := bytes.IndexByte(t, '?'); q >= 0 {
		h.path, h.query = t[:q], t[q:]
	} else {
		h.path = t
	}
	if hasDotSegment(h.path) {
		return errDotSegment
	}
	return nil
}

var slash = []byte("/")

// hasDotSegment reports whether p has a "." or ".." segment, also in
// percent-encoded form. Clients resolve these before sending (RFC 3986
// section 5.2.4), so only a probe sends them; refusing them means the path
// knit routes on is the path the backend sees.
func hasDotSegment(p []byte) bool {
	i := 0
	for i < len(p) {
		if p[i] != '/' {
			i++
			continue
		}
		j := i + 1
		k := j
		for k < len(p) && p[k] != '/' {
			k++
		}
		if isDots(p[j:k]) {
			return true
		}
		i = k
	}
	return false
}

func isDots(seg []byte) bool {
	n := 0
	for i := 0; i < len(seg); {
		switch {
		case seg[i] == '.':
			i++
		case i+2 < len(seg) && seg[i] == '%' && seg[i+1] == '2' && (seg[i+2] == 'e' || seg[i+2] == 'E'):
			i += 3
		default:
			return false
		}
		n++
	}
	return n == 1 || n == 2
}

// parseField splits "name: value" with the checks that matter for a proxy:
// a token name with nothing between it and the colon (RFC 9112 section 5.1
// requires rejecting whitespace there), no obsolete line folding, no
// control characters in the value.
func parseField(line []byte) (name, value []byte, err *httpError) {
	c := bytes.IndexByte(line, ':')
	if c <= 0 {
		return nil, nil, errBadHeader
	}
	name = line[:c]
	for _, b := range name {
		if !tchar[b] {
			return nil, nil, errBadHeader
		}
	}
	v := line[c+1:]
	for _, b := range v {
		if !fieldByte[b] {
			return nil, nil, errBadHeader
		}
	}
	return name, trimOWS(v), nil
}

func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// parseContentLength accepts only 1*DIGIT (no sign, no list, no spaces).
func parseContentLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

const maxConnTokens = 8

// parseConnection records the Connection options. Other options name
// headers that must not be forwarded (RFC 9110 section 7.6.1).
func (h *reqHead) parseConnection(v []byte) *httpError {
	for len(v) > 0 {
		var tok []byte
		if i := bytes.IndexByte(v, ','); i >= 0 {
			tok, v = trimOWS(v[:i]), v[i+1:]
		} else {
			tok, v = trimOWS(v), nil
		}
		switch {
		case len(tok) == 0:
		case eqFold(tok, "close"):
			h.connClose = true
		case eqFold(tok, "keep-alive"):
			h.connKeepAlive = true
		case eqFold(tok, "upgrade"):
			h.connUpgrade = true
		default:
			if len(h.connTokens) >= maxConnTokens {
				return errBadHeader
			}
			h.connTokens = append(h.connTokens, tok)
		}
	}
	return nil
}

// listedInConnection reports whether name is one of the extra Connection
// options.
func listedInConnection(tokens [][]byte, name []byte) bool {
	for _, t := range tokens {
		if eqFoldBytes(t, name) {
			return true
		}
	}
	return false
}

// respHead is a parsed response head from an upstream.
type respHead struct {
	status        int
	reason        []byte
	http11        bool
	headers       []header
	contentLength int64 // -1: none
	chunked       bool
	connClose     bool
	connKeepAlive bool
	connTokens    [][]byte
	headLen       int
}

var (
	errUpstreamHead   = errors.New("malformed response head from upstream")
	errUpstreamFrame  = errors.New("ambiguous or unsupported response framing from upstream")
	errUpstreamChunks = errors.New("malformed chunked body from upstream")
)

func (h *respHead) reset() {
	hs, ct := h.headers[:0], h.connTokens[:0]
	*h = respHead{headers: hs, connTokens: ct, contentLength: -1}
}

// parseResponseHead parses an upstream's status line and fields. Upstreams
// are trusted more than clients but framing is still checked: a response
// with two lengths could desynchronise a pooled connection.
func parseResponseHead(head []byte, h *respHead, maxHeaders int) error {
	h.reset()
	h.headLen = len(head)
	line, rest, ok := nextLine(head)
	if !ok || len(line) < 12 || string(line[:7]) != "HTTP/1." || line[8] != ' ' {
		return errUpstreamHead
	}
	switch line[7] {
	case '1':
		h.http11 = true
	case '0':
	default:
		return errUpstreamHead
	}
	code := line[9:12]
	for _, c := range code {
		if c < '0' || c > '9' {
			return errUpstreamHead
		}
	}
	h.status = int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
	if h.status < 100 {
		return errUpstreamHead
	}
	if len(line) > 12 {
		if line[12] != ' ' {
			return errUpstreamHead
		}
		h.reason = line[13:]
		for _, c := range h.reason {
			if !fieldByte[c] {
				return errUpstreamHead
			}
		}
	}
	clSeen, teSeen := false, false
	for {
		line, rest, ok = nextLine(rest)
		if !ok {
			return errUpstreamHead
		}
		if len(line) == 0 {
			break
		}
		if len(h.headers) >= maxHeaders {
			return errUpstreamHead
		}
		name, value, err := parseField(line)
		if err != nil {
			return errUpstreamHead
		}
		k := classify(name)
		h.headers = append(h.headers, header{name: name, value: value, kind: k})
		switch k {
		case hContentLength:
			n, ok := parseContentLength(value)
			if !ok || (clSeen && n != h.contentLength) {
				return errUpstreamFrame
			}
			clSeen = true
			h.contentLength = n
		case hTransferEncoding:
			if teSeen || !eqFold(value, "chunked") {
				return errUpstreamFrame
			}
			teSeen = true
			h.chunked = true
		case hConnection:
			var tmp reqHead
			tmp.connTokens = h.connTokens
			if tmp.parseConnection(value) != nil {
				return errUpstreamHead
			}
			h.connClose = h.connClose || tmp.connClose
			h.connKeepAlive = h.connKeepAlive || tmp.connKeepAlive
			h.connTokens = tmp.connTokens
		}
	}
	if h.chunked && clSeen {
		return errUpstreamFrame
	}
	return nil
}

// reader is a connection's read buffer. Unlike bufio.Reader it exposes the
// buffered bytes, so heads can be parsed in place and bodies forwarded
// without copying.
type reader struct {
	c    net.Conn
	buf  []byte
	r, w int
	err  error // sticky read error
	// peer, when set, is flushed before a read that might block, so that
	// bytes copied so far reach the other side without waiting for more.
	peer *bufWriter
	// refresh, when set, is the read deadline given to each read.
	refresh time.Duration
}

func (rd *reader) buffered() []byte { return rd.buf[rd.r:rd.w] }

// fill reads at least one more byte, moving unread data to the front when
// the tail is full. It fails with errBufferFull if the buffer is full of
// unread data.
func (rd *reader) fill() error {
	if rd.peer != nil && len(rd.peer.buf) > 0 {
		if rd.peer.flush() != nil {
			return errPeerWrite
		}
	}
	if rd.err != nil {
		return rd.err
	}
	if rd.w == len(rd.buf) {
		if rd.r == 0 {
			return errBufferFull
		}
		copy(rd.buf, rd.buf[rd.r:rd.w])
		rd.w -= rd.r
		rd.r = 0
	} else if rd.r == rd.w {
		rd.r, rd.w = 0, 0
	}
	if rd.refresh > 0 {
		_ = rd.c.SetReadDeadline(time.Now().Add(rd.refresh))
	}
	n, err := rd.c.Read(rd.buf[rd.w:])
	rd.w += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	rd.err = err
	return err
}

var errBufferFull = errors.New("buffer full")

// readHead fills the buffer until a whole head is in it and returns it. It
// returns errHeadTooLarge past max bytes.
func (rd *reader) readHead(max int) ([]byte, error) {
	scanned := 0
	for {
		b := rd.buf[rd.r:rd.w]
		if n := findHeadEnd(b, scanned); n >= 0 {
			if n > max {
				return nil, errHeadTooLarge
			}
			rd.r += n
			return b[:n], nil
		}
		scanned = len(b)
		if scanned >= max {
			return nil, errHeadTooLarge
		}
		if rd.w == len(rd.buf) && rd.r == 0 {
			// Full buffer, no head yet: grow up to max once.
			if len(rd.buf) >= max {
				return nil, errHeadTooLarge
			}
			nb := make([]byte, max)
			copy(nb, rd.buf[:rd.w])
			rd.buf = nb
		}
		if err := rd.fill(); err != nil {
			return nil, err
		}
	}
}

// readLine returns one line of a chunked body (without terminator) of at
// most max bytes. The slice is valid until the next read.
func (rd *reader) readLine(max int) ([]byte, error) {
	for {
		b := rd.buf[rd.r:rd.w]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			rd.r += i + 1
			line := b[:i]
			if len(line) > 0 && line[len(line)-1] == '\r' {
				line = line[:len(line)-1]
			}
			return line, nil
		}
		if len(b) > max {
			return nil, errBadChunked
		}
		if err := rd.fill(); err != nil {
			if err == errBufferFull {
				return nil, errBadChunked
			}
			return nil, err
		}
	}
}

// parseChunkSize parses "1*HEXDIG [ BWS ; chunk-ext ]".
func parseChunkSize(line []byte) (int64, bool) {
	end := len(line)
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		end = i
		for _, c := range line[i:] {
			if c < 0x20 && c != '\t' || c == 0x7f {
				return 0, false
			}
		}
	}
	digits := line[:end]
	for len(digits) > 0 && (digits[len(digits)-1] == ' ' || digits[len(digits)-1] == '\t') && end < len(line) {
		digits = digits[:len(digits)-1]
	}
	if len(digits) == 0 || len(digits) > 15 {
		return 0, false
	}
	var n int64
	for _, c := range digits {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		n = n<<4 | int64(d)
	}
	return n, true
}

// deadline is time.Now().Add(d), or the zero time (no deadline) for d <= 0.
func deadline(d time.Duration) time.Time {
	if d <= 0 {
		return time.Time{}
	}
	return time.Now().Add(d)
}
