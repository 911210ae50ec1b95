package echo

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// The gRPC-style side of the echo server: a request with Content-Type
// application/grpc (any path) is a stream of length-prefixed messages
// (1 byte compressed flag, 4 bytes big-endian length, the message, as gRPC
// frames them over HTTP/2); each message is written back as soon as it has
// been read, and the response ends with the Grpc-Status and Grpc-Message
// trailers. It needs no protobuf: proxies only see the framing, the
// streaming and the trailers, which is what tests of a proxy need.
//
// The response head carries Echo-Pod and Echo-Proto (the protocol the pod
// saw), so a test can tell who answered and whether HTTP/2 reached the pod.

// maxGRPCMessage bounds one message, like gRPC's default receive limit.
const maxGRPCMessage = 4 << 20

// GRPCFrame frames one message (uncompressed).
func GRPCFrame(msg []byte) []byte {
	b := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	return append(b, msg...)
}

// ReadGRPCFrame reads one length-prefixed message; io.EOF at a message
// boundary means the stream ended cleanly.
func ReadGRPCFrame(r io.Reader) ([]byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:1]); err != nil {
		return nil, err // io.EOF: clean end
	}
	if _, err := io.ReadFull(r, hdr[1:]); err != nil {
		return nil, io.ErrUnexpectedEOF
	}
	if hdr[0] != 0 {
		return nil, errors.New("grpc: compressed messages are not supported")
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxGRPCMessage {
		return nil, fmt.Errorf("grpc: message of %d bytes is over the %d byte limit", n, maxGRPCMessage)
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, io.ErrUnexpectedEOF
	}
	return msg, nil
}

func isGRPC(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+") || strings.HasPrefix(ct, "application/grpc;")
}

// serveGRPC echoes each message of the request stream.
func serveGRPC(w http.ResponseWriter, r *http.Request, cfg Config) {
	h := w.Header()
	h.Set("Content-Type", "application/grpc")
	h.Set("Echo-Pod", cfg.Pod)
	h.Set("Echo-Proto", r.Proto)
	h.Set("Trailer", "Grpc-Status, Grpc-Message")
	rc := http.NewResponseController(w)
	// HTTP/1.1 would otherwise consume the whole request body before the
	// response starts; HTTP/2 streams are full duplex anyway.
	_ = rc.EnableFullDuplex()
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	status, message := "0", ""
	for {
		msg, err := ReadGRPCFrame(r.Body)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			status, message = "3", err.Error() // INVALID_ARGUMENT
			break
		}
		if _, err := w.Write(GRPCFrame(msg)); err != nil {
			return
		}
		_ = rc.Flush()
	}
	h.Set("Grpc-Status", status)
	h.Set("Grpc-Message", message)
}
