package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Component is one part of the networking layer (CNI node setup, overlay,
// proxy, DNS, ingress). The agent runs each under the supervisor.
type Component interface {
	// Name is a short, stable identifier used in logs, metrics and /readyz.
	Name() string
	// Run does the component's work until ctx is done. It returns nil on a
	// clean stop; an error makes the supervisor log it and run it again
	// after a backoff. Run must never tear down the data plane on return.
	Run(ctx context.Context) error
	// Ready reports whether the component has synced its state and is
	// serving; /readyz is the AND of every enabled component's Ready.
	Ready() bool
}

// supervisor runs components, restarting any that fail, until ctx ends.
// A failing component never stops the others: a broken DNS upstream must not
// take Services down.
type supervisor struct {
	log      *slog.Logger
	restarts *prometheus.CounterVec
	up       *prometheus.GaugeVec

	mu       sync.Mutex
	lastErr  map[string]string
	restartN map[string]int
}

func newSupervisor(log *slog.Logger, reg prometheus.Registerer) *supervisor {
	s := &supervisor{
		log: log,
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knit_component_restarts_total",
			Help: "Times a component's Run returned an error and was restarted.",
		}, []string{"component"}),
		up: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "knit_component_ready",
			Help: "1 when the component reports Ready.",
		}, []string{"component"}),
		lastErr:  map[string]string{},
		restartN: map[string]int{},
	}
	reg.MustRegister(s.restarts, s.up)
	return s
}

const (
	minRestartDelay = 500 * time.Millisecond
	maxRestartDelay = 30 * time.Second
)

// run starts every component and blocks until ctx is done and all of them
// have returned.
func (s *supervisor) run(ctx context.Context, comps []Component) {
	var wg sync.WaitGroup
	for _, c := range comps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.runOne(ctx, c)
		}()
	}
	wg.Wait()
}

func (s *supervisor) runOne(ctx context.Context, c Component) {
	log := s.log.With("component", c.Name())
	delay := minRestartDelay
	for {
		start := time.Now()
		err := runProtected(ctx, c)
		if ctx.Err() != nil {
			if err != nil && !errors.Is(err, context.Canceled) {
				log.Warn("component stopped with error", "err", err)
			}
			return
		}
		if err == nil {
			err = errors.New("returned before shutdown")
		}
		s.mu.Lock()
		s.lastErr[c.Name()] = err.Error()
		s.restartN[c.Name()]++
		s.mu.Unlock()
		s.restarts.WithLabelValues(c.Name()).Inc()
		if time.Since(start) > maxRestartDelay {
			delay = minRestartDelay
		}
		log.Error("component failed; restarting", "err", err, "after", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(delay*2, maxRestartDelay)
	}
}

// runProtected turns a panic in a component into an error, so one bad
// object cannot kill the process and with it every other component.
func runProtected(ctx context.Context, c Component) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &panicError{value: r}
		}
	}()
	return c.Run(ctx)
}

type panicError struct{ value any }

func (p *panicError) Error() string { return "panic: " + slog.AnyValue(p.value).String() }

// lastError returns the most recent failure of a component, if any.
func (s *supervisor) lastError(name string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr[name]
}

// restartCount returns how often a component was restarted.
func (s *supervisor) restartCount(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restartN[name]
}
