package lab

import (
	"net"
	"strings"

	"github.com/miekg/dns"
)

// UpstreamZone is answered by the lab's upstream resolver, standing in for
// the internet's DNS (the sandbox has no uplink): every name under it has
// the A record UpstreamAnswer, except nx.<zone>, which does not exist.
const (
	UpstreamZone   = "example.test."
	UpstreamAnswer = "198.18.0.254"
	UpstreamAddr   = UnderlayGateway + ":53"
)

// startUpstreamDNS serves UpstreamZone on UpstreamAddr (UDP and TCP) in the
// sandbox root; every node agent forwards non-cluster names to it.
func startUpstreamDNS() (stop func(), err error) {
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Authoritative = true
		if len(r.Question) != 1 {
			m.Rcode = dns.RcodeFormatError
			_ = w.WriteMsg(m)
			return
		}
		q := r.Question[0]
		name := strings.ToLower(q.Name)
		switch {
		case !dns.IsSubDomain(UpstreamZone, name):
			m.Rcode = dns.RcodeRefused
		case name == "nx."+UpstreamZone:
			m.Rcode = dns.RcodeNameError
		case q.Qtype == dns.TypeA:
			m.Answer = append(m.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A:   net.ParseIP(UpstreamAnswer),
			})
		}
		_ = w.WriteMsg(m)
	})
	udp := &dns.Server{Addr: UpstreamAddr, Net: "udp", Handler: h}
	tcp := &dns.Server{Addr: UpstreamAddr, Net: "tcp", Handler: h}
	ready := make(chan error, 2)
	udp.NotifyStartedFunc = func() { ready <- nil }
	tcp.NotifyStartedFunc = func() { ready <- nil }
	go func() {
		if err := udp.ListenAndServe(); err != nil {
			ready <- err
		}
	}()
	go func() {
		if err := tcp.ListenAndServe(); err != nil {
			ready <- err
		}
	}()
	for range 2 {
		if err := <-ready; err != nil {
			_ = udp.Shutdown()
			_ = tcp.Shutdown()
			return nil, err
		}
	}
	return func() { _ = udp.Shutdown(); _ = tcp.Shutdown() }, nil
}
