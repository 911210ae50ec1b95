package ingress

import (
	"knit.dev/knit/status"
)

// Status is the ingress's section of the agent's status document (not to
// be confused with the Ingress objects' status, which statusWriter writes).
func (c *Controller) Status() *status.Ingress {
	st := &status.Ingress{Sync: c.syncRec.Get()}
	// The listeners are set by Run before it stores ready (happens-before).
	if c.ready.Load() {
		if a := c.HTTPAddr(); a != nil {
			st.HTTP = a.String()
		}
		if a := c.HTTPSAddr(); a != nil {
			st.HTTPS = a.String()
		}
	}
	if res := c.last.Load(); res != nil {
		st.Ingresses = len(res.served)
		if res.table != nil {
			st.Routes = res.table.routes
		}
		for _, p := range res.problems {
			st.Problems = append(st.Problems, p.ingress.String()+": "+p.reason+": "+p.message)
		}
	}
	return st
}
