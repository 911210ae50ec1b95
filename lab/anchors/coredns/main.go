// Command knit-coredns is CoreDNS at a pinned release (see go.mod), built
// with only the plugins the lab's DNS benchmark needs. It is the anchor knit's
// cluster DNS is measured against (DESIGN.md, "Targets"), not part of the
// knit product; it lives in a Go module of its own so that the product's
// go.mod does not inherit CoreDNS's dependency tree.
//
// This is the external-build recipe CoreDNS documents: import
// core/dnsserver and coremain, register the wanted plugins by importing them,
// and set the plugin chain (dnsserver.SetDirectives) in the order of upstream's
// plugin.cfg. Flags and the Corefile syntax are upstream's:
//
//	knit-coredns -conf Corefile
//
// The plugins:
//
//	bind        listen on one address, as knit does (a wildcard socket costs
//	            CoreDNS a control message per packet; leaving it out would
//	            handicap the anchor)
//	health      /health for liveness
//	errors      log errors, as every stock Corefile does
//	cache       the "cache 30" of the Kubernetes default Corefile
//	kubernetes  the cluster zone, from informers on the API server
//	forward     everything else, to the lab's upstream resolver
//
// Left out on purpose: prometheus, log, loop, reload, loadbalance and ready
// of the stock kube-dns Corefile. Each adds per-query or background work, so
// the anchor measured here is, if anything, faster than a default CoreDNS
// deployment.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

// directives is the plugin chain, a subset of upstream's plugin.cfg in its
// order (a plugin sees the effects of every plugin after it): cache before
// kubernetes and forward, so both are cached.
var directives = []string{
	"bind",
	"health",
	"errors",
	"cache",
	"kubernetes",
	"forward",
}

func main() {
	// SetDirectives only validates the list; it cannot fail on this one.
	if err := dnsserver.SetDirectives(directives); err != nil {
		panic(err)
	}
	coremain.Run()
}
