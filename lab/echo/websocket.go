package echo

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// The WebSocket side of the echo server (RFC 6455), small enough to read in
// one go: the opening handshake, and a frame echo. Every data frame comes
// back as it was sent (same FIN bit and opcode, so fragmented messages stay
// fragmented), pings get pongs, a close is answered with a close. Tests
// drive it through an ingress with the client half below (DialWebSocket).

// WebSocket opcodes.
const (
	OpContinuation = 0x0
	OpText         = 0x1
	OpBinary       = 0x2
	OpClose        = 0x8
	OpPing         = 0x9
	OpPong         = 0xA
)

// maxFramePayload bounds what the echo server (and client) will buffer for
// one frame.
const maxFramePayload = 1 << 20

// wsGUID is the fixed string the accept key is derived with (RFC 6455 1.3).
const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// wsIdleTimeout closes a WebSocket that has been silent this long.
const wsIdleTimeout = 2 * time.Minute

// Frame is one WebSocket frame, unmasked.
type Frame struct {
	Fin     bool
	Opcode  byte
	Masked  bool // as it arrived on the wire
	Payload []byte
}

// WebSocketAccept is the Sec-WebSocket-Accept value for a client's key.
func WebSocketAccept(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// ReadFrame reads one frame and unmasks its payload.
func ReadFrame(r io.Reader) (Frame, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Frame{}, err
	}
	f := Frame{Fin: hdr[0]&0x80 != 0, Opcode: hdr[0] & 0x0F, Masked: hdr[1]&0x80 != 0}
	if hdr[0]&0x70 != 0 {
		return f, errors.New("websocket: reserved bits set")
	}
	n := uint64(hdr[1] & 0x7F)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return f, err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return f, err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	if f.Opcode >= OpClose && (n > 125 || !f.Fin) {
		return f, errors.New("websocket: control frame fragmented or longer than 125 bytes")
	}
	if n > maxFramePayload {
		return f, fmt.Errorf("websocket: frame of %d bytes is over the %d byte limit", n, maxFramePayload)
	}
	var key [4]byte
	if f.Masked {
		if _, err := io.ReadFull(r, key[:]); err != nil {
			return f, err
		}
	}
	f.Payload = make([]byte, n)
	if _, err := io.ReadFull(r, f.Payload); err != nil {
		return f, err
	}
	if f.Masked {
		for i := range f.Payload {
			f.Payload[i] ^= key[i%4]
		}
	}
	return f, nil
}

// WriteFrame writes one frame; clients must mask (RFC 6455 5.1), servers
// must not.
func WriteFrame(w io.Writer, fin bool, opcode byte, payload []byte, mask bool) error {
	b := make([]byte, 0, 14+len(payload))
	first := opcode & 0x0F
	if fin {
		first |= 0x80
	}
	b = append(b, first)
	var maskBit byte
	if mask {
		maskBit = 0x80
	}
	switch n := len(payload); {
	case n <= 125:
		b = append(b, maskBit|byte(n))
	case n <= 0xFFFF:
		b = append(b, maskBit|126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, maskBit|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	if !mask {
		b = append(b, payload...)
	} else {
		var key [4]byte
		if _, err := rand.Read(key[:]); err != nil {
			return err
		}
		b = append(b, key[:]...)
		for i, c := range payload {
			b = append(b, c^key[i%4])
		}
	}
	_, err := w.Write(b)
	return err
}

// hasToken reports whether a comma-separated header holds token
// (case-insensitive), as Connection: keep-alive, Upgrade does.
func hasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// serveWebSocket does the opening handshake and then echoes frames until
// the client closes or goes quiet.
func serveWebSocket(w http.ResponseWriter, r *http.Request) {
	if !hasToken(r.Header, "Upgrade", "websocket") || !hasToken(r.Header, "Connection", "upgrade") {
		w.Header().Set("Upgrade", "websocket")
		http.Error(w, "this is a WebSocket echo: send Upgrade: websocket", http.StatusUpgradeRequired)
		return
	}
	if r.Header.Get("Sec-WebSocket-Version") != "13" {
		w.Header().Set("Sec-WebSocket-Version", "13")
		http.Error(w, "unsupported Sec-WebSocket-Version", http.StatusUpgradeRequired)
		return
	}
	key := r.Header.Get("Sec-WebSocket-Key")
	if k, err := base64.StdEncoding.DecodeString(key); err != nil || len(k) != 16 {
		http.Error(w, "bad Sec-WebSocket-Key", http.StatusBadRequest)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "cannot take over the connection: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + WebSocketAccept(key) + "\r\n\r\n")
	if brw.Flush() != nil {
		return
	}
	for {
		_ = conn.SetReadDeadline(time.Now().Add(wsIdleTimeout))
		f, err := ReadFrame(brw.Reader)
		if err != nil {
			_ = WriteFrame(conn, true, OpClose, closePayload(1002, "protocol error"), false)
			return
		}
		if !f.Masked {
			_ = WriteFrame(conn, true, OpClose, closePayload(1002, "client frames must be masked"), false)
			return
		}
		switch f.Opcode {
		case OpClose:
			_ = WriteFrame(conn, true, OpClose, f.Payload, false)
			return
		case OpPing:
			err = WriteFrame(conn, true, OpPong, f.Payload, false)
		case OpPong:
		case OpContinuation, OpText, OpBinary:
			err = WriteFrame(conn, f.Fin, f.Opcode, f.Payload, false)
		default:
			_ = WriteFrame(conn, true, OpClose, closePayload(1002, "unknown opcode"), false)
			return
		}
		if err != nil {
			return
		}
	}
}

func closePayload(code uint16, reason string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, code), reason...)
}

// WSConn is the client end of a WebSocket (for tests).
type WSConn struct {
	net.Conn
	br *bufio.Reader
}

// DialWebSocket does the opening handshake on an established connection
// (plain TCP or TLS) for http://host/path and returns the WebSocket on it.
// The response must be 101 with the right Sec-WebSocket-Accept.
func DialWebSocket(conn net.Conn, host, path string) (*WSConn, error) {
	var k [16]byte
	if _, err := rand.Read(k[:]); err != nil {
		return nil, err
	}
	key := base64.StdEncoding.EncodeToString(k[:])
	req := "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		return nil, fmt.Errorf("websocket handshake: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("websocket handshake: status %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	if got := resp.Header.Get("Sec-WebSocket-Accept"); got != WebSocketAccept(key) {
		return nil, fmt.Errorf("websocket handshake: Sec-WebSocket-Accept %q, want %q", got, WebSocketAccept(key))
	}
	if !hasToken(resp.Header, "Upgrade", "websocket") {
		return nil, fmt.Errorf("websocket handshake: Upgrade %q", resp.Header.Get("Upgrade"))
	}
	return &WSConn{Conn: conn, br: br}, nil
}

// WriteMessage sends one unfragmented, masked message.
func (c *WSConn) WriteMessage(opcode byte, payload []byte) error {
	return WriteFrame(c.Conn, true, opcode, payload, true)
}

// WriteFragment sends one masked frame of a fragmented message.
func (c *WSConn) WriteFragment(fin bool, opcode byte, payload []byte) error {
	return WriteFrame(c.Conn, fin, opcode, payload, true)
}

// ReadFrame reads the next frame from the server.
func (c *WSConn) ReadFrame() (Frame, error) { return ReadFrame(c.br) }
