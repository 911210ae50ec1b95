package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	"knit.dev/knit/cni/ipam"
	"knit.dev/knit/cni/plugin"
)

// podsByNode is the Pod informer index the reconciliation reads: the pods
// the cache has on one node.
const podsByNode = "knit.dev/cni-node"

func podNodeIndex(obj any) ([]string, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok || p.Spec.NodeName == "" {
		return nil, nil
	}
	return []string{p.Spec.NodeName}, nil
}

// podLister is what the reconciliation needs from the Pod cache.
type podLister interface {
	// podsOn returns the pods the cache has on node.
	podsOn(node string) ([]*corev1.Pod, error)
}

type indexedPods struct{ idx cache.Indexer }

func (p indexedPods) podsOn(node string) ([]*corev1.Pod, error) {
	objs, err := p.idx.ByIndex(podsByNode, node)
	if err != nil {
		return nil, err
	}
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		if pod, ok := o.(*corev1.Pod); ok {
			out = append(out, pod)
		}
	}
	return out, nil
}

// podKey is a pod's namespace/name.
type podKey struct{ namespace, name string }

// staleness decides which reservations the reconciliation may release.
type staleness struct {
	present map[podKey]bool // pods the cache has on this node
	now     time.Time
	grace   time.Duration
	// netnsExists reports whether a reservation's network namespace path
	// still exists (unknown is "exists").
	netnsExists func(path string) bool
}

// stale reports whether r is leaked: it names its pod (CNI_ARGS carried
// K8S_POD_NAMESPACE and K8S_POD_NAME), no pod of that namespace and name is
// on this node, it is older than the grace period, and its network
// namespace is gone. Everything else stays, because releasing the address
// of a live pod gives it to a second pod, which is far worse than leaking
// it until the runtime's GC:
//
//   - no pod identity: only the runtime knows; CNI GC handles it;
//   - matched by namespace and name, not UID: a static pod's CNI_ARGS
//     carry the UID kubelet computed from its manifest, while its mirror
//     Pod in the API has a UID of its own;
//   - the grace period covers a pod the runtime sets up before the watch
//     delivered it; a zero or future creation time never qualifies;
//   - a namespace that still exists means the sandbox is still there (the
//     runtime will DEL it): the guard against an informer that is stale
//     because the API server is unreachable. Where the agent cannot see
//     the runtime's namespace paths, the check passes and the others
//     decide.
func (s *staleness) stale(r ipam.Reservation) bool {
	if r.Pod.Namespace == "" || r.Pod.Name == "" {
		return false
	}
	if s.present[podKey{r.Pod.Namespace, r.Pod.Name}] {
		return false
	}
	if r.Created.IsZero() || s.now.Sub(r.Created) < s.grace {
		return false
	}
	if r.Netns != "" && s.netnsExists(r.Netns) {
		return false
	}
	return true
}

// netnsExists is the production netnsExists: anything but "does not exist"
// counts as existing.
func netnsExists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

// reconcile releases the reservations of pods that are gone from this node
// (see staleness.stale), with their hostPort rules and host veths, and
// deletes the host veths DEL detached that no reservation claims (see
// plugin.SweepHostVeths).
func (s *Setup) reconcile() error {
	store, err := s.openStore()
	if err != nil {
		return err
	}
	st, err := store.View()
	if err != nil {
		return err
	}
	pods, err := s.pods.podsOn(s.cfg.NodeName)
	if err != nil {
		return fmt.Errorf("pods on %s: %w", s.cfg.NodeName, err)
	}
	sn := &staleness{present: make(map[podKey]bool, len(pods)), now: s.now(), grace: s.cfg.ReleaseGrace, netnsExists: s.netnsExists}
	for _, p := range pods {
		sn.present[podKey{p.Namespace, p.Name}] = true
	}
	var errs []error
	if sw, ok := s.k.(vethSweeper); ok {
		// Reservations made after the View above belong to ADDs whose veths
		// are up and on the bridge, which the sweep never touches.
		deleted, err := sw.sweepHostVeths(plugin.ReservedHostVeths(st.Reservations))
		for _, name := range deleted {
			s.log.Info("deleted a host veth DEL had detached whose pod namespace was never removed", "link", name)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	found := false
	for _, r := range st.Reservations {
		found = found || sn.stale(r)
	}
	if !found {
		return errors.Join(errs...) // nothing to release: no lock, no write
	}
	// Decided again under the store's lock, on the state as it is then.
	released, err := plugin.ReleaseWhere(store, s.newNFT, sn.stale)
	if err != nil {
		errs = append(errs, err)
	}
	for _, r := range released {
		s.m.released.Inc()
		s.log.Info("released the addresses of a pod that is gone from this node",
			"pod", r.Pod.Namespace+"/"+r.Pod.Name, "uid", r.Pod.UID, "container", r.ContainerID, "ifname", r.IfName,
			"ips", r.IPs, "hostPorts", len(r.PortMappings), "age", sn.now.Sub(r.Created).Round(time.Second))
		// Its namespace is gone, so the veth went with it; a host end
		// that somehow survived must not keep the address reachable.
		if err := s.k.deleteLink(plugin.HostVethName(r.ContainerID, r.IfName)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// vethSweeper is the kernel's optional sweep of detached host veths (the
// real kernel has it; fakes without it skip the sweep).
type vethSweeper interface {
	// sweepHostVeths is plugin.SweepHostVeths in the node's namespace.
	sweepHostVeths(reserved map[string]bool) ([]string, error)
}

func (k netlinkKernel) sweepHostVeths(reserved map[string]bool) (deleted []string, err error) {
	err = k.run(func() error {
		deleted, err = plugin.SweepHostVeths(reserved)
		return err
	})
	return deleted, err
}
