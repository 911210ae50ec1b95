// Package echo is the lab's workload: a small server that runs in each pod
// network namespace and tells the caller who answered and whom it saw.
//
//	HTTP :8080  any path -> {"pod","namespace","node","client","host","path","proto"}
//	            /healthz -> 200, or 503 when readiness is set to fail
//	            /ws      -> WebSocket (RFC 6455) echo of every frame
//	            Content-Type application/grpc -> gRPC-style message echo
//	H2C  :8081  the same handler, HTTP/1.1 and HTTP/2 without TLS (prior
//	            knowledge), for backends with appProtocol kubernetes.io/h2c
//	TCP  :9000  echoes bytes back
//	UDP  :9001  echoes each datagram back, prefixed with "<pod> "
//
// The client address in the answers is what end-to-end tests use to check
// source-IP preservation (externalTrafficPolicy Local) and masquerading;
// the protocol is how they see that a proxy spoke HTTP/2 to the pod.
package echo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// Ports the echo server listens on.
const (
	HTTPPort = 8080
	H2CPort  = 8081
	TCPPort  = 9000
	UDPPort  = 9001
)

// Config says who the server is.
type Config struct {
	Pod, Namespace, Node string
	// FailReadiness makes /healthz answer 503 (for readiness tests).
	FailReadiness bool
}

// Reply is the HTTP answer body.
type Reply struct {
	Pod       string `json:"pod"`
	Namespace string `json:"namespace"`
	Node      string `json:"node"`
	Client    string `json:"client"`
	Host      string `json:"host"`
	Path      string `json:"path"`
	// Proto is the request's protocol as the pod saw it ("HTTP/1.1",
	// "HTTP/2.0").
	Proto string `json:"proto,omitempty"`
}

// Serve runs the four listeners until ctx is done.
func Serve(ctx context.Context, cfg Config, log *slog.Logger) error {
	httpLn, err := net.Listen("tcp", fmt.Sprintf(":%d", HTTPPort))
	if err != nil {
		return err
	}
	h2cLn, err := net.Listen("tcp", fmt.Sprintf(":%d", H2CPort))
	if err != nil {
		return err
	}
	tcpLn, err := net.Listen("tcp", fmt.Sprintf(":%d", TCPPort))
	if err != nil {
		return err
	}
	udp, err := net.ListenPacket("udp", fmt.Sprintf(":%d", UDPPort))
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: Handler(cfg), ReadHeaderTimeout: 10 * time.Second}
	h2c := &http.Server{Handler: Handler(cfg), ReadHeaderTimeout: 10 * time.Second, Protocols: new(http.Protocols)}
	h2c.Protocols.SetHTTP1(true)
	h2c.Protocols.SetUnencryptedHTTP2(true)
	var wg sync.WaitGroup
	wg.Add(4)
	go func() { defer wg.Done(); _ = srv.Serve(httpLn) }()
	go func() { defer wg.Done(); _ = h2c.Serve(h2cLn) }()
	go func() { defer wg.Done(); serveTCP(tcpLn) }()
	go func() { defer wg.Done(); serveUDP(udp, cfg.Pod) }()
	log.Info("echo serving", "pod", cfg.Pod, "node", cfg.Node)
	<-ctx.Done()
	_ = srv.Close()
	_ = h2c.Close()
	_ = tcpLn.Close()
	_ = udp.Close()
	wg.Wait()
	return nil
}

// Handler is the HTTP side of the echo server.
func Handler(cfg Config) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if cfg.FailReadiness {
			http.Error(w, "readiness set to fail", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/ws", serveWebSocket)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if isGRPC(r) {
			serveGRPC(w, r, cfg)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(Reply{
			Pod: cfg.Pod, Namespace: cfg.Namespace, Node: cfg.Node,
			Client: r.RemoteAddr, Host: r.Host, Path: r.URL.Path, Proto: r.Proto,
		})
	})
	return mux
}

func serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

func serveUDP(pc net.PacketConn, pod string) {
	buf := make([]byte, 65535)
	prefix := []byte(pod + " ")
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		out := append(append([]byte{}, prefix...), buf[:n]...)
		_, _ = pc.WriteTo(out, addr)
	}
}
