package dns

import (
	"encoding/binary"
	"errors"

	mdns "github.com/miekg/dns"
)

// This file reads queries and writes responses directly in wire format. The
// common query (one question, at most an OPT record) is parsed without
// allocating, and every answer is either a response packed ahead of time
// (cluster records, cached upstream answers) that only needs its ID, flags,
// question case and OPT record patched, or a short error/negative response
// written byte by byte. Anything unusual is either rejected here or handed to
// github.com/miekg/dns in the slow path.

const (
	headerLen = 12
	maxName   = 255

	// minUDP is the payload every DNS client accepts (RFC 1035).
	minUDP = 512
	// maxTCP is the largest message a TCP frame can carry.
	maxTCP = 65535

	flagQR = 0x80 // byte 2
	flagAA = 0x04 // byte 2
	flagTC = 0x02 // byte 2
	flagRD = 0x01 // byte 2
	flagRA = 0x80 // byte 3
	flagCD = 0x10 // byte 3

	// optLen is the size of the OPT record written in responses: root
	// owner, type, class (payload size), TTL (extended rcode, version,
	// flags), empty RDATA.
	optLen = 11
)

// query is a parsed request. It lives in a worker and is reused.
type query struct {
	id     uint16
	opcode uint8
	rd, cd bool

	// name is the question name in wire format, lowercased; labels holds
	// the offset of every label in name (the root label not included).
	name    []byte
	nameBuf [maxName + 1]byte
	labels  [128]uint8
	nlabels int

	qtype, qclass uint16
	qend          int // offset just past the question in the request

	edns        bool
	ednsSize    uint16
	ednsVersion uint8
	do          bool
	tsig        bool
}

// parseResult says what the parser made of a request.
type parseResult uint8

const (
	parseOK       parseResult = iota
	parseDrop                 // not worth an answer: too short, or a response
	parseFormErr              // header readable, the rest is not
	parseFormErrQ             // question readable, additional section is not
	parseNotImpl              // an opcode other than QUERY
)

// parse reads req into q. It never allocates and never reads past req.
func (q *query) parse(req []byte) parseResult {
	q.name = q.nameBuf[:0]
	q.nlabels = 0
	q.edns, q.do, q.tsig = false, false, false
	q.ednsSize, q.ednsVersion = 0, 0
	q.qend = 0
	if len(req) < headerLen {
		return parseDrop
	}
	q.id = binary.BigEndian.Uint16(req)
	if req[2]&flagQR != 0 {
		// Never answer a response: that is how two servers loop or a
		// spoofed packet turns us into a reflector.
		return parseDrop
	}
	q.opcode = (req[2] >> 3) & 0x0F
	q.rd = req[2]&flagRD != 0
	q.cd = req[3]&flagCD != 0
	if q.opcode != mdns.OpcodeQuery {
		return parseNotImpl
	}
	qd := binary.BigEndian.Uint16(req[4:])
	an := binary.BigEndian.Uint16(req[6:])
	ns := binary.BigEndian.Uint16(req[8:])
	ar := binary.BigEndian.Uint16(req[10:])
	if qd != 1 || an != 0 || ns != 0 {
		return parseFormErr
	}
	off := headerLen
	for {
		if off >= len(req) {
			return parseFormErr
		}
		l := int(req[off])
		if l == 0 {
			off++
			break
		}
		// A compression pointer (or the reserved 0x40/0x80 label types)
		// has no business in the question of a query: refusing it here
		// also rules out pointer loops.
		if l > 63 || q.nlabels >= len(q.labels) {
			return parseFormErr
		}
		if len(q.name)+1+l+1 > maxName || off+1+l > len(req) {
			return parseFormErr
		}
		q.labels[q.nlabels] = uint8(len(q.name))
		q.nlabels++
		q.name = append(q.name, byte(l))
		for _, c := range req[off+1 : off+1+l] {
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			q.name = append(q.name, c)
		}
		off += 1 + l
	}
	q.name = append(q.name, 0)
	if off+4 > len(req) {
		return parseFormErr
	}
	q.qtype = binary.BigEndian.Uint16(req[off:])
	q.qclass = binary.BigEndian.Uint16(req[off+2:])
	off += 4
	q.qend = off
	// Additional section: at most one OPT (RFC 6891), maybe a TSIG. Other
	// records are skipped.
	for i := 0; i < int(ar); i++ {
		// Owner name: OPT's is the root; skip anything else label by
		// label (pointers end a name).
		root := off < len(req) && req[off] == 0
		for {
			if off >= len(req) {
				return parseFormErrQ
			}
			l := int(req[off])
			if l == 0 {
				off++
				break
			}
			if l&0xC0 == 0xC0 {
				off += 2
				break
			}
			if l > 63 {
				return parseFormErrQ
			}
			off += 1 + l
		}
		if off+10 > len(req) {
			return parseFormErrQ
		}
		typ := binary.BigEndian.Uint16(req[off:])
		class := binary.BigEndian.Uint16(req[off+2:])
		ttl := binary.BigEndian.Uint32(req[off+4:])
		rdlen := int(binary.BigEndian.Uint16(req[off+8:]))
		off += 10
		if off+rdlen > len(req) {
			return parseFormErrQ
		}
		off += rdlen
		switch typ {
		case mdns.TypeOPT:
			if q.edns || !root {
				return parseFormErrQ // RFC 6891 6.1.1: more than one OPT is FORMERR
			}
			q.edns = true
			q.ednsSize = class
			q.ednsVersion = uint8(ttl >> 16)
			q.do = ttl&0x8000 != 0
		case mdns.TypeTSIG:
			q.tsig = true
		}
	}
	return parseOK
}

// limit is the largest response the client accepts on this transport.
func (q *query) limit(tcp bool, maxUDP int) int {
	if tcp {
		return maxTCP
	}
	if !q.edns {
		return minUDP
	}
	n := int(q.ednsSize)
	if n < minUDP {
		n = minUDP
	}
	if n > maxUDP {
		n = maxUDP
	}
	return n
}

// presentation returns q.name as a lowercase FQDN ("." for the root). It
// allocates; only slow paths call it.
func (q *query) presentation() string {
	if len(q.name) <= 1 {
		return "."
	}
	s, _, err := mdns.UnpackDomainName(q.name, 0)
	if err != nil {
		return "."
	}
	return s
}

// header writes a response header for q with the given rcode and counts.
func header(out []byte, q *query, rcode int, aa bool, qd, an, ns, ar uint16) []byte {
	var b [headerLen]byte
	binary.BigEndian.PutUint16(b[0:], q.id)
	b[2] = flagQR | q.opcode<<3
	if aa {
		b[2] |= flagAA
	}
	if q.rd {
		b[2] |= flagRD
	}
	b[3] = flagRA | byte(rcode&0x0F)
	if q.cd {
		b[3] |= flagCD
	}
	binary.BigEndian.PutUint16(b[4:], qd)
	binary.BigEndian.PutUint16(b[6:], an)
	binary.BigEndian.PutUint16(b[8:], ns)
	binary.BigEndian.PutUint16(b[10:], ar)
	return append(out, b[:]...)
}

// appendOPT adds our OPT record when the client sent one (RFC 6891 6.1.1:
// a responder that understands EDNS answers with an OPT). rcode is the full
// (possibly extended) rcode; its upper 8 bits go into the OPT TTL.
func appendOPT(out []byte, q *query, rcode int, maxUDP int) []byte {
	var b [optLen]byte
	// b[0] = 0: root owner
	binary.BigEndian.PutUint16(b[1:], mdns.TypeOPT)
	binary.BigEndian.PutUint16(b[3:], uint16(maxUDP))
	b[5] = byte(rcode >> 4)
	b[6] = 0 // version
	if q.do {
		b[7] = 0x80 // RFC 3225: the DO bit is copied into the response
	}
	return append(out, b[:]...)
}

// errorResponse writes an answer that carries only an rcode. The question is
// echoed when it was readable, and an OPT is added when the client's was.
func (s *Server) errorResponse(out []byte, q *query, req []byte, rcode int, withQuestion bool) []byte {
	qd := uint16(0)
	if withQuestion && q.qend > 0 {
		qd = 1
	}
	ar := uint16(0)
	if q.edns {
		ar = 1
	}
	out = header(out[:0], q, rcode, false, qd, 0, 0, ar)
	if qd == 1 {
		out = append(out, req[headerLen:q.qend]...)
	}
	if q.edns {
		out = appendOPT(out, q, rcode, s.cfg.UDPSize)
	}
	return out
}

// emit copies the packed response tpl (ID 0, no OPT, question name in
// lowercase) into out and makes it the answer to q: ID, RD/CD/opcode,
// question case (a resolver using 0x20 randomisation checks it), OPT, and
// the size limit. alt, if not nil, is the same response without the
// optional additional records, used when tpl does not fit. age, when
// non-zero, is subtracted from the TTL at each offset in ttlOffs (cached
// upstream answers).
func (s *Server) emit(out []byte, tpl, alt []byte, q *query, req []byte, limit int, age uint32, ttlOffs []uint16) []byte {
	extra := 0
	if q.edns {
		extra = optLen
	}
	if len(tpl)+extra > limit && alt != nil {
		tpl = alt
	}
	if len(tpl) < headerLen || q.qend > len(tpl) {
		return s.errorResponse(out, q, req, mdns.RcodeServerFailure, true)
	}
	if len(tpl)+extra > limit {
		// Does not fit: header and question only, TC set, so that the
		// client retries over TCP (RFC 2181 9). Never larger than the
		// query itself plus an OPT.
		rcode := int(tpl[3] & 0x0F)
		out = header(out[:0], q, rcode, tpl[2]&flagAA != 0, 1, 0, 0, 0)
		out[2] |= flagTC
		out = append(out, req[headerLen:q.qend]...)
		if q.edns {
			binary.BigEndian.PutUint16(out[10:], 1)
			out = appendOPT(out, q, rcode, s.cfg.UDPSize)
		}
		return out
	}
	out = append(out[:0], tpl...)
	binary.BigEndian.PutUint16(out[0:], q.id)
	out[2] = flagQR | q.opcode<<3 | (tpl[2] & flagAA)
	if q.rd {
		out[2] |= flagRD
	}
	out[3] = flagRA | (tpl[3] & 0x0F)
	if q.cd {
		out[3] |= flagCD
	}
	// The template's question has the same length as the request's (they
	// differ in case at most): copy the request's bytes over it.
	copy(out[headerLen:q.qend], req[headerLen:q.qend])
	if age > 0 {
		for _, o := range ttlOffs {
			i := int(o)
			if i+4 > len(out) {
				break
			}
			ttl := binary.BigEndian.Uint32(out[i:])
			if ttl > age {
				ttl -= age
			} else {
				ttl = 0
			}
			binary.BigEndian.PutUint32(out[i:], ttl)
		}
	}
	if q.edns {
		ar := binary.BigEndian.Uint16(out[10:])
		binary.BigEndian.PutUint16(out[10:], ar+1)
		out = appendOPT(out, q, int(tpl[3]&0x0F), s.cfg.UDPSize)
	}
	return out
}

// soaTail is the packed SOA record of a zone after its owner name: type,
// class, TTL, RDLENGTH and RDATA (MNAME, RNAME uncompressed).
func packSOATail(soa *mdns.SOA) ([]byte, error) {
	buf := make([]byte, 512)
	// Pack with a one-byte root owner, then cut it off.
	saved := soa.Hdr.Name
	soa.Hdr.Name = "."
	n, err := mdns.PackRR(soa, buf, 0, nil, false)
	soa.Hdr.Name = saved
	if err != nil {
		return nil, err
	}
	return append([]byte(nil), buf[1:n]...), nil
}

// negative writes NXDOMAIN or NODATA (rcode NOERROR, no answer) for q with
// the zone's SOA in the authority section (RFC 2308), the SOA owner being a
// compression pointer to the zone apex inside the question name.
func (s *Server) negative(out []byte, q *query, req []byte, rcode int, apexOff int, soaTail []byte) []byte {
	ar := uint16(0)
	if q.edns {
		ar = 1
	}
	out = header(out[:0], q, rcode, true, 1, 0, 1, ar)
	out = append(out, req[headerLen:q.qend]...)
	ptr := 0xC000 | uint16(headerLen+apexOff)
	out = append(out, byte(ptr>>8), byte(ptr))
	out = append(out, soaTail...)
	if q.edns {
		out = appendOPT(out, q, rcode, s.cfg.UDPSize)
	}
	return out
}

// soaAnswer writes the zone's SOA as the answer to a SOA query at its apex.
func (s *Server) soaAnswer(out []byte, q *query, req []byte, soaTail []byte) []byte {
	ar := uint16(0)
	if q.edns {
		ar = 1
	}
	out = header(out[:0], q, mdns.RcodeSuccess, true, 1, 1, 0, ar)
	out = append(out, req[headerLen:q.qend]...)
	out = append(out, 0xC0, headerLen)
	out = append(out, soaTail...)
	if q.edns {
		out = appendOPT(out, q, 0, s.cfg.UDPSize)
	}
	return out
}

// hinfoRFC8482 is the RDATA of the synthesized answer to ANY queries:
// CPU "RFC8482", OS "" (RFC 8482 4.2).
var hinfoRFC8482 = []byte{7, 'R', 'F', 'C', '8', '4', '8', '2', 0}

// anyAnswer answers an ANY query with one small synthesized HINFO record, so
// that ANY can never be used to amplify.
func (s *Server) anyAnswer(out []byte, q *query, req []byte, ttl uint32, aa bool) []byte {
	ar := uint16(0)
	if q.edns {
		ar = 1
	}
	out = header(out[:0], q, mdns.RcodeSuccess, aa, 1, 1, 0, ar)
	out = append(out, req[headerLen:q.qend]...)
	var b [12]byte
	b[0], b[1] = 0xC0, headerLen
	binary.BigEndian.PutUint16(b[2:], mdns.TypeHINFO)
	binary.BigEndian.PutUint16(b[4:], mdns.ClassINET)
	binary.BigEndian.PutUint32(b[6:], ttl)
	binary.BigEndian.PutUint16(b[10:], uint16(len(hinfoRFC8482)))
	out = append(out, b[:]...)
	out = append(out, hinfoRFC8482...)
	if q.edns {
		out = appendOPT(out, q, 0, s.cfg.UDPSize)
	}
	return out
}

var errBadMessage = errors.New("malformed message")

// ttlOffsets returns the offset of the TTL field of every record in the
// packed message msg (OPT excluded), so that cached copies can be aged in
// place without unpacking.
func ttlOffsets(msg []byte) ([]uint16, error) {
	if len(msg) < headerLen {
		return nil, errBadMessage
	}
	qd := int(binary.BigEndian.Uint16(msg[4:]))
	rr := int(binary.BigEndian.Uint16(msg[6:])) + int(binary.BigEndian.Uint16(msg[8:])) + int(binary.BigEndian.Uint16(msg[10:]))
	off := headerLen
	skipName := func() error {
		for {
			if off >= len(msg) {
				return errBadMessage
			}
			l := int(msg[off])
			switch {
			case l == 0:
				off++
				return nil
			case l&0xC0 == 0xC0:
				off += 2
				return nil
			case l > 63:
				return errBadMessage
			}
			off += 1 + l
		}
	}
	for i := 0; i < qd; i++ {
		if err := skipName(); err != nil {
			return nil, err
		}
		off += 4
	}
	offs := make([]uint16, 0, rr)
	for i := 0; i < rr; i++ {
		if err := skipName(); err != nil {
			return nil, err
		}
		if off+10 > len(msg) || off+4 > 0xFFFF {
			return nil, errBadMessage
		}
		typ := binary.BigEndian.Uint16(msg[off:])
		if typ != mdns.TypeOPT {
			offs = append(offs, uint16(off+4))
		}
		off += 10 + int(binary.BigEndian.Uint16(msg[off+8:]))
		if off > len(msg) {
			return nil, errBadMessage
		}
	}
	return offs, nil
}
