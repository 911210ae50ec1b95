package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"knit.dev/knit/cni/node"
	"knit.dev/knit/dns"
	"knit.dev/knit/ingress"
	"knit.dev/knit/overlay"
	"knit.dev/knit/proxy"
	"knit.dev/knit/status"
)

// statusDoc assembles the node's status document from the supervisor and
// each component's Status. It reads only what the components keep in
// memory, so it is cheap enough to serve on every request.
func (a *Agent) statusDoc() *status.Node {
	doc := &status.Node{
		Version:    status.Version,
		Node:       a.cfg.NodeName,
		Agent:      a.cfg.Version,
		Time:       time.Now(),
		Started:    a.started,
		HealthAddr: a.healthAddr.Load().(string),
	}
	for _, c := range a.comps {
		doc.Components = append(doc.Components, status.Component{
			Name: c.Name(), Ready: c.Ready(),
			Restarts: a.sup.restartCount(c.Name()), LastError: a.sup.lastError(c.Name()),
		})
		switch c := c.(type) {
		case *node.Setup:
			doc.CNI = c.Status()
		case *overlay.Overlay:
			doc.Overlay = c.Status()
		case *proxy.Proxier:
			doc.Proxy = c.Status()
		case *dns.Server:
			doc.DNS = c.Status()
		case *ingress.Controller:
			doc.Ingress = c.Status()
		}
	}
	return doc
}

func (a *Agent) serveStatus(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(a.statusDoc())
}

// publishStatus keeps this node's status Lease current: the Summary is
// written when the node's own state changes (readiness, errors, podCIDRs,
// MTU: at most every MinPublishInterval) and with fresh counters at every
// renewal (RenewInterval), so a node costs about one API write a minute
// however busy the cluster is, and nobody watches these Leases. On return (the agent is
// stopping) it writes State "stopped", best effort.
func (a *Agent) publishStatus(ctx context.Context) {
	var last *status.Summary
	var lastWrite time.Time
	tick := time.NewTicker(status.MinPublishInterval)
	defer tick.Stop()
	failures := 0
	for {
		sum := status.Summarize(a.statusDoc(), status.StateRunning)
		due := last == nil || time.Since(lastWrite) >= status.RenewInterval || !last.SameState(sum)
		if due && failures > 0 && time.Since(lastWrite) < time.Duration(min(failures, 6))*status.MinPublishInterval {
			due = false // back off while the API server fails us
		}
		if due {
			if err := a.writeLease(ctx, &sum); err != nil {
				if ctx.Err() == nil {
					failures++
					a.log.Warn("publishing node status failed", "err", err, "namespace", a.cfg.StatusNamespace)
				}
			} else {
				failures = 0
				last = &sum
			}
			lastWrite = time.Now()
		}
		select {
		case <-ctx.Done():
			stopCtx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			sum := status.Summarize(a.statusDoc(), status.StateStopped)
			if err := a.writeLease(stopCtx, &sum); err != nil {
				a.log.Info("could not mark the node status stopped", "err", err)
			}
			cancel()
			return
		case <-tick.C:
		}
	}
}

// writeLease creates or updates knit-node-<node> with the summary.
func (a *Agent) writeLease(ctx context.Context, sum *status.Summary) error {
	raw, err := json.Marshal(sum)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	leases := a.conn.Client.CoordinationV1().Leases(a.cfg.StatusNamespace)
	name := status.LeaseName(a.cfg.NodeName)
	now := metav1.NewMicroTime(time.Now())
	duration := int32(3 * status.RenewInterval / time.Second)
	holder := a.cfg.NodeName
	l, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: a.cfg.StatusNamespace,
				Labels:      map[string]string{status.LeaseLabel: "true"},
				Annotations: map[string]string{status.SummaryAnnotation: string(raw)}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &duration, RenewTime: &now},
		}
		_, err = leases.Create(ctx, l, metav1.CreateOptions{FieldManager: "knit-status"})
		return err
	}
	if err != nil {
		return err
	}
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	if l.Labels == nil {
		l.Labels = map[string]string{}
	}
	l.Labels[status.LeaseLabel] = "true"
	l.Annotations[status.SummaryAnnotation] = string(raw)
	l.Spec.HolderIdentity, l.Spec.LeaseDurationSeconds, l.Spec.RenewTime = &holder, &duration, &now
	_, err = leases.Update(ctx, l, metav1.UpdateOptions{FieldManager: "knit-status"})
	if apierrors.IsConflict(err) {
		return errors.New("status Lease changed under us; retrying at the next publish")
	}
	return err
}
