package echo

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// Pure unit tests on loopback: no sandbox needed.

var testCfg = Config{Pod: "p1", Namespace: "ns", Node: "n1"}

// h2cServer serves the echo handler as Serve's H2C listener does.
func h2cServer(t *testing.T) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(Handler(testCfg))
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

func h2cClient() *http.Client {
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

func TestReplyProto(t *testing.T) {
	addr := h2cServer(t)
	for _, tc := range []struct {
		name   string
		client *http.Client
		want   string
	}{
		{"http1", &http.Client{Timeout: 5 * time.Second}, "HTTP/1.1"},
		{"h2c", h2cClient(), "HTTP/2.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := tc.client.Get("http://" + addr + "/x/y")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var r Reply
			if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
				t.Fatal(err)
			}
			if r.Proto != tc.want || r.Pod != "p1" || r.Path != "/x/y" {
				t.Errorf("reply %+v, want proto %s", r, tc.want)
			}
		})
	}
}

func TestGRPCEcho(t *testing.T) {
	addr := h2cServer(t)
	for _, tc := range []struct {
		name   string
		client *http.Client
		proto  string
	}{
		{"h2c", h2cClient(), "HTTP/2.0"},
		{"http1", &http.Client{Timeout: 5 * time.Second}, "HTTP/1.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Streaming: each message comes back before the next is sent.
			pr, pw := io.Pipe()
			req, _ := http.NewRequest("POST", "http://"+addr+"/knit.lab.Echo/Echo", pr)
			req.Header.Set("Content-Type", "application/grpc")
			req.Header.Set("TE", "trailers")
			type result struct {
				resp *http.Response
				err  error
			}
			done := make(chan result, 1)
			go func() {
				resp, err := tc.client.Do(req)
				done <- result{resp, err}
			}()
			if _, err := pw.Write(GRPCFrame([]byte("one"))); err != nil {
				t.Fatal(err)
			}
			res := <-done
			if res.err != nil {
				t.Fatal(res.err)
			}
			resp := res.resp
			defer resp.Body.Close()
			if resp.Header.Get("Echo-Proto") != tc.proto || resp.Header.Get("Echo-Pod") != "p1" {
				t.Errorf("head %v", resp.Header)
			}
			for _, m := range []string{"one", "two", strings.Repeat("x", 70000)} {
				if m != "one" {
					if _, err := pw.Write(GRPCFrame([]byte(m))); err != nil {
						t.Fatal(err)
					}
				}
				got, err := ReadGRPCFrame(resp.Body)
				if err != nil || string(got) != m {
					t.Fatalf("echo of %.10q: %.10q, %v", m, got, err)
				}
			}
			pw.Close()
			if _, err := ReadGRPCFrame(resp.Body); err != io.EOF {
				t.Errorf("end of stream: %v", err)
			}
			if resp.Trailer.Get("Grpc-Status") != "0" {
				t.Errorf("trailers %v", resp.Trailer)
			}
		})
	}
}

func TestGRPCBadFrame(t *testing.T) {
	addr := h2cServer(t)
	req, _ := http.NewRequest("POST", "http://"+addr+"/svc/M", bytes.NewReader([]byte{1, 0, 0, 0, 1, 'x'}))
	req.Header.Set("Content-Type", "application/grpc")
	resp, err := h2cClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Trailer.Get("Grpc-Status") != "3" {
		t.Errorf("compressed frame: trailers %v", resp.Trailer)
	}
}

func wsDial(t *testing.T, addr string) *WSConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	ws, err := DialWebSocket(c, "ws.example", "/ws")
	if err != nil {
		t.Fatal(err)
	}
	return ws
}

func TestWebSocketEcho(t *testing.T) {
	srv := httptest.NewServer(Handler(testCfg))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	ws := wsDial(t, addr)

	type frame struct {
		fin    bool
		op     byte
		msg    string
		wantOp byte // what comes back
	}
	for _, f := range []frame{
		{true, OpText, "hello", OpText},
		{true, OpBinary, string([]byte{0, 1, 2, 255}), OpBinary},
		{true, OpText, strings.Repeat("m", 300), OpText},       // 16-bit length
		{true, OpBinary, strings.Repeat("l", 70000), OpBinary}, // 64-bit length
		{false, OpText, "frag-", OpText},                       // fragmented message
		{true, OpContinuation, "end", OpContinuation},
		{true, OpPing, "are you there", OpPong},
		{true, OpText, "", OpText},
	} {
		if err := ws.WriteFragment(f.fin, f.op, []byte(f.msg)); err != nil {
			t.Fatal(err)
		}
		got, err := ws.ReadFrame()
		if err != nil {
			t.Fatalf("echo of %.10q: %v", f.msg, err)
		}
		if got.Opcode != f.wantOp || got.Fin != f.fin || string(got.Payload) != f.msg || got.Masked {
			t.Errorf("sent fin=%v op=%d %.10q, got fin=%v op=%d masked=%v %.10q", f.fin, f.op, f.msg, got.Fin, got.Opcode, got.Masked, got.Payload)
		}
	}
	if err := ws.WriteMessage(OpClose, closePayload(1000, "bye")); err != nil {
		t.Fatal(err)
	}
	got, err := ws.ReadFrame()
	if err != nil || got.Opcode != OpClose || binary.BigEndian.Uint16(got.Payload) != 1000 {
		t.Errorf("close: %+v, %v", got, err)
	}
	if _, err := ws.ReadFrame(); err == nil {
		t.Error("connection still open after close")
	}
}

func TestWebSocketRejects(t *testing.T) {
	srv := httptest.NewServer(Handler(testCfg))
	defer srv.Close()

	// Not an upgrade: 426.
	resp, err := http.Get(srv.URL + "/ws")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Errorf("plain GET /ws: %d", resp.StatusCode)
	}

	// An unmasked client frame closes with 1002.
	ws := wsDial(t, srv.Listener.Addr().String())
	if err := WriteFrame(ws.Conn, true, OpText, []byte("x"), false); err != nil {
		t.Fatal(err)
	}
	got, err := ws.ReadFrame()
	if err != nil || got.Opcode != OpClose || binary.BigEndian.Uint16(got.Payload) != 1002 {
		t.Errorf("unmasked frame: %+v, %v", got, err)
	}

	// A wrong accept key is caught by the client.
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, _ := http.NewResponseController(w).Hijack()
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n")
		brw.Flush()
	}))
	defer fake.Close()
	c, err := net.Dial("tcp", fake.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := DialWebSocket(c, "x", "/ws"); err == nil || !strings.Contains(err.Error(), "Accept") {
		t.Errorf("bad accept key: %v", err)
	}
}

func TestWebSocketAcceptRFCExample(t *testing.T) {
	// RFC 6455 section 1.3.
	if got := WebSocketAccept("dGhlIHNhbXBsZSBub25jZQ=="); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Errorf("accept %q", got)
	}
}

// FuzzReadFrame: any input is either rejected or read back as the frame a
// writer would have produced; nothing panics or allocates past the limit.
func FuzzReadFrame(f *testing.F) {
	var b bytes.Buffer
	_ = WriteFrame(&b, true, OpText, []byte("hello"), true)
	f.Add(b.Bytes())
	b.Reset()
	_ = WriteFrame(&b, false, OpBinary, bytes.Repeat([]byte{7}, 300), false)
	f.Add(b.Bytes())
	f.Add([]byte{0x81, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF})
	f.Add([]byte{0x89, 0xFE, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, in []byte) {
		fr, err := ReadFrame(bytes.NewReader(in))
		if err != nil {
			return
		}
		var out bytes.Buffer
		if err := WriteFrame(&out, fr.Fin, fr.Opcode, fr.Payload, false); err != nil {
			t.Fatal(err)
		}
		again, err := ReadFrame(&out)
		if err != nil || again.Fin != fr.Fin || again.Opcode != fr.Opcode || !bytes.Equal(again.Payload, fr.Payload) {
			t.Fatalf("round trip of %+v: %+v, %v", fr, again, err)
		}
	})
}
