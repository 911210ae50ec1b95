package agent

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// warningComponent is a ready component with something to report.
type warningComponent struct {
	fakeComponent
	warnings []string
}

func (w *warningComponent) Warnings() []string { return w.warnings }

// TestReadyzWarnings: a component's warnings (the proxy's iptables-legacy
// vs iptables-nft mismatch) show on /readyz without making it unready.
func TestReadyzWarnings(t *testing.T) {
	a := &Agent{reg: prometheus.NewRegistry(), log: quietLog()}
	a.sup = newSupervisor(a.log, a.reg)
	c := &warningComponent{fakeComponent: fakeComponent{name: "proxy"}, warnings: []string{"iptables mismatch: both hold rules"}}
	c.ready.Store(true)
	a.comps = []Component{c}
	srv := httptest.NewServer(a.healthMux())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), "ok\n") ||
		!strings.Contains(string(body), "warning: proxy: iptables mismatch: both hold rules\n") {
		t.Errorf("/readyz = %d %q", resp.StatusCode, body)
	}
}
