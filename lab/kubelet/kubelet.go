// Package kubelet is the lab's simulated kubelet: the part of a kubelet and a
// container runtime that networking depends on, and nothing else.
//
// One runs per lab node, inside that node's network namespace (so the CNI
// plugins it executes see the node's links). For every Pod bound to its node:
//
//	Pod added    -> netns "pod-<uid8>" + resolv.conf -> CNI ADD (libcni, the
//	                node's conflist) -> echo workload in the pod netns ->
//	                status: Running, podIP(s) from the CNI result, Ready from
//	                an HTTP readiness probe to the pod
//	Pod deleting -> status Ready=false (endpoints drain) -> wait DrainDelay ->
//	                stop workload -> CNI DEL -> remove netns -> delete the Pod
//	                object with grace 0 (what the real kubelet's status
//	                manager does)
//	every 2 s    -> CNI STATUS of the node's conflist (as containerd does for
//	                the CRI's NetworkReady) -> the Node's Ready condition:
//	                False with the plugin's error while the network is not
//	                ready, as the real kubelet reports it
//
// It uses libcni exactly as container runtimes do, so the same code drives
// knit's plugin and the reference bridge + host-local + portmap plugins.
package kubelet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	cnitypes "github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"knit.dev/knit/lab/echo"
)

// Annotations the lab understands on Pods.
const (
	// AnnotationFailReadiness makes the workload's readiness probe fail.
	AnnotationFailReadiness = "lab.knit.dev/fail-readiness"
)

// Config is one node's kubelet.
type Config struct {
	NodeName   string
	NodeIP     string
	CNIConfDir string
	CNIBinDirs []string
	CNICache   string
	// Workload is the argv prefix that starts the echo server in a pod
	// netns; the kubelet appends --pod/--namespace/--node flags.
	Workload []string
	// ClusterDNS and ClusterDomain are written into each pod's resolv.conf.
	ClusterDNS    string
	ClusterDomain string
	// DrainDelay is how long a deleting pod stays (not Ready) before its
	// network is torn down, so that in-flight requests finish.
	DrainDelay time.Duration
}

// Kubelet runs pods of one node.
type Kubelet struct {
	cfg    Config
	client kubernetes.Interface
	log    *slog.Logger
	cni    *libcni.CNIConfig
	pods   cache.SharedIndexInformer
	queue  workqueue.TypedRateLimitingInterface[string]

	mu        sync.Mutex
	sandboxes map[string]*sandbox // by pod namespace/name
}

type sandbox struct {
	uid         string
	containerID string
	netns       string // name under /run/netns
	ips         []string
	workload    *exec.Cmd
	ready       bool
	probeErr    string // why the last readiness probe failed
	stopProbe   context.CancelFunc
}

// New builds a kubelet for cfg.NodeName.
func New(cfg Config, client kubernetes.Interface, log *slog.Logger) *Kubelet {
	if cfg.DrainDelay == 0 {
		cfg.DrainDelay = time.Second
	}
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
		}))
	k := &Kubelet{
		cfg:       cfg,
		client:    client,
		log:       log.With("node", cfg.NodeName),
		cni:       libcni.NewCNIConfigWithCacheDir(cfg.CNIBinDirs, cfg.CNICache, nil),
		pods:      factory.Core().V1().Pods().Informer(),
		queue:     workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
		sandboxes: map[string]*sandbox{},
	}
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			k.queue.Add(key)
		}
	}
	_, _ = k.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, n any) { enqueue(n) },
		DeleteFunc: enqueue,
	})
	return k
}

// Run syncs pods until ctx is done. Sandboxes are left running on return, as
// a real kubelet restart leaves containers running.
func (k *Kubelet) Run(ctx context.Context) error {
	go k.pods.Run(ctx.Done())
	go k.reportNetworkStatus(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), k.pods.HasSynced) {
		return ctx.Err()
	}
	const workers = 8
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k.processNext(ctx) {
			}
		}()
	}
	<-ctx.Done()
	k.queue.ShutDown()
	wg.Wait()
	return nil
}

func (k *Kubelet) processNext(ctx context.Context) bool {
	key, quit := k.queue.Get()
	if quit {
		return false
	}
	defer k.queue.Done(key)
	if err := k.sync(ctx, key); err != nil {
		k.log.Warn("pod sync failed; retrying", "pod", key, "err", err)
		k.queue.AddRateLimited(key)
		return true
	}
	k.queue.Forget(key)
	return true
}

func (k *Kubelet) sync(ctx context.Context, key string) error {
	obj, exists, err := k.pods.GetIndexer().GetByKey(key)
	if err != nil {
		return err
	}
	k.mu.Lock()
	sb := k.sandboxes[key]
	k.mu.Unlock()
	if !exists {
		if sb != nil {
			return k.teardown(ctx, key, sb)
		}
		return nil
	}
	pod := obj.(*corev1.Pod)
	if sb != nil && sb.uid != string(pod.UID) {
		// Same name, new pod: the old sandbox is stale.
		if err := k.teardown(ctx, key, sb); err != nil {
			return err
		}
		sb = nil
	}
	if pod.DeletionTimestamp != nil {
		return k.terminate(ctx, key, pod, sb)
	}
	if sb == nil {
		return k.start(ctx, key, pod)
	}
	return nil
}

// start creates the pod's network and workload and reports it Running.
func (k *Kubelet) start(ctx context.Context, key string, pod *corev1.Pod) error {
	list, err := k.confList()
	if err != nil {
		return err
	}
	sb := &sandbox{uid: string(pod.UID), containerID: randomID(), netns: "pod-" + string(pod.UID)[:8]}
	if err := k.writeResolvConf(sb.netns, pod.Namespace); err != nil {
		return err
	}
	if out, err := netnsCommand(ctx, "add", sb.netns).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", sb.netns, err, out)
	}
	// The runtime, not the CNI network, brings up the pod's loopback
	// (containerd does it itself, CRI-O through the loopback plugin).
	if out, err := exec.CommandContext(ctx, "ip", "-n", sb.netns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		_ = k.removeNetns(sb.netns)
		return fmt.Errorf("pod loopback up: %v: %s", err, out)
	}
	rt := k.runtimeConf(pod, sb)
	start := time.Now()
	res, err := k.cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		// A failed ADD has rolled itself back; remove our netns too.
		_ = k.removeNetns(sb.netns)
		return fmt.Errorf("CNI ADD: %w", err)
	}
	result, err := current.NewResultFromResult(res)
	if err != nil {
		_ = k.cni.DelNetworkList(ctx, list, rt)
		_ = k.removeNetns(sb.netns)
		return fmt.Errorf("CNI result: %w", err)
	}
	for _, ip := range result.IPs {
		sb.ips = append(sb.ips, ip.Address.IP.String())
	}
	k.log.Info("pod network added", "pod", key, "ips", sb.ips, "took", time.Since(start).Round(time.Microsecond))
	if err := k.startWorkload(pod, sb); err != nil {
		_ = k.cni.DelNetworkList(ctx, list, rt)
		_ = k.removeNetns(sb.netns)
		return err
	}
	k.mu.Lock()
	k.sandboxes[key] = sb
	k.mu.Unlock()
	if err := k.writeStatus(ctx, pod, sb); err != nil {
		return err
	}
	probeCtx, cancel := context.WithCancel(ctx)
	sb.stopProbe = cancel
	go k.probe(probeCtx, key, pod, sb)
	return nil
}

func (k *Kubelet) runtimeConf(pod *corev1.Pod, sb *sandbox) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{
		ContainerID: sb.containerID,
		NetNS:       "/run/netns/" + sb.netns,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", pod.Namespace},
			{"K8S_POD_NAME", pod.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", sb.containerID},
			{"K8S_POD_UID", string(pod.UID)},
		},
	}
	var mappings []map[string]any
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.HostPort == 0 {
				continue
			}
			proto := string(p.Protocol)
			if proto == "" {
				proto = "TCP"
			}
			mappings = append(mappings, map[string]any{
				"hostPort": p.HostPort, "containerPort": p.ContainerPort, "protocol": lower(proto), "hostIP": p.HostIP,
			})
		}
	}
	if len(mappings) > 0 {
		rt.CapabilityArgs = map[string]any{"portMappings": mappings}
	}
	return rt
}

func lower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// confList loads the first network config list in the node's CNI config
// dir, as kubelet/containerd do; none yet means the network is not ready.
func (k *Kubelet) confList() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(k.cfg.CNIConfDir, []string{".conflist"})
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("network not ready: no CNI config in %s", k.cfg.CNIConfDir)
	}
	return libcni.ConfListFromFile(files[0])
}

// networkStatusPeriod is how often the network's readiness is checked.
const networkStatusPeriod = 2 * time.Second

// reportNetworkStatus asks the CNI plugins for their STATUS, as containerd
// does for the CRI's NetworkReady, and writes the Node's Ready condition
// when the answer changes: kubelet reports NotReady with "container runtime
// network not ready: ... Network plugin returns error: <the plugin's
// message>" (a node whose pool is exhausted, a plugin whose config is not
// written yet).
func (k *Kubelet) reportNetworkStatus(ctx context.Context) {
	last := "unknown"
	for {
		msg := ""
		list, err := k.confList()
		if err == nil {
			err = k.cni.GetStatusNetworkList(ctx, list)
		}
		if err != nil {
			msg = "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: " + err.Error()
		}
		if msg != last && ctx.Err() == nil {
			if err := k.setNodeReady(ctx, msg); err != nil {
				k.log.Warn("writing the Node's Ready condition failed", "err", err)
			} else {
				last = msg
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(networkStatusPeriod):
		}
	}
}

// setNodeReady sets the Node's Ready condition: True when notReady is
// empty, else False with notReady as the message.
func (k *Kubelet) setNodeReady(ctx context.Context, notReady string) error {
	cond := corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		Message: "kubelet is posting ready status"}
	if notReady != "" {
		cond.Status, cond.Reason, cond.Message = corev1.ConditionFalse, "KubeletNotReady", notReady
	}
	return wait.ExponentialBackoffWithContext(ctx, wait.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Steps: 5}, func(ctx context.Context) (bool, error) {
		node, err := k.client.CoreV1().Nodes().Get(ctx, k.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		now := metav1.Now()
		cond.LastHeartbeatTime, cond.LastTransitionTime = now, now
		conds := []corev1.NodeCondition{cond}
		for _, c := range node.Status.Conditions {
			switch {
			case c.Type != corev1.NodeReady:
				conds = append(conds, c)
			case c.Status == cond.Status && c.Message == cond.Message:
				return true, nil // already so
			case c.Status == cond.Status:
				conds[0].LastTransitionTime = c.LastTransitionTime
			}
		}
		node.Status.Conditions = conds
		_, err = k.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err == nil, nil
	})
}

func (k *Kubelet) writeResolvConf(netns, namespace string) error {
	dir := filepath.Join("/etc/netns", netns)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	d := k.cfg.ClusterDomain
	content := fmt.Sprintf("nameserver %s\nsearch %s.svc.%s svc.%s %s\noptions ndots:5\n",
		k.cfg.ClusterDNS, namespace, d, d, d)
	return os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(content), 0o644)
}

func (k *Kubelet) startWorkload(pod *corev1.Pod, sb *sandbox) error {
	args := append([]string{"netns", "exec", sb.netns}, k.cfg.Workload...)
	args = append(args, "--pod", pod.Name, "--namespace", pod.Namespace, "--node", k.cfg.NodeName)
	if pod.Annotations[AnnotationFailReadiness] == "true" {
		args = append(args, "--fail-readiness")
	}
	cmd := exec.Command("ip", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start workload: %w", err)
	}
	go func() { _ = cmd.Wait() }()
	sb.workload = cmd
	return nil
}

// probe runs the readiness check every 500 ms and reports changes.
func (k *Kubelet) probe(ctx context.Context, key string, pod *corev1.Pod, sb *sandbox) {
	if len(sb.ips) == 0 {
		return
	}
	client := &http.Client{Timeout: time.Second}
	url := "http://" + net.JoinHostPort(sb.ips[0], strconv.Itoa(echo.HTTPPort)) + "/healthz"
	_ = wait.PollUntilContextCancel(ctx, 500*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		ready, why := false, ""
		if resp, err := client.Get(url); err == nil {
			ready = resp.StatusCode == http.StatusOK
			if !ready {
				why = fmt.Sprintf("HTTP probe failed with statuscode: %d", resp.StatusCode)
			}
			resp.Body.Close()
		}
		k.mu.Lock()
		changed := sb.ready != ready
		sb.ready = ready
		// An Event when the workload answers "not ready", once per reason
		// (not while it is still starting: no Event storm on pod churn).
		report := why != "" && why != sb.probeErr
		sb.probeErr = why
		k.mu.Unlock()
		if report {
			k.probeFailedEvent(ctx, pod, why)
		}
		if changed {
			if err := k.writeStatus(ctx, pod, sb); err != nil && ctx.Err() == nil {
				k.log.Warn("status update failed", "pod", key, "err", err)
				k.mu.Lock()
				sb.ready = !ready // try again next round
				k.mu.Unlock()
			}
		}
		return false, nil
	})
}

func (k *Kubelet) writeStatus(ctx context.Context, pod *corev1.Pod, sb *sandbox) error {
	k.mu.Lock()
	ready := sb.ready
	k.mu.Unlock()
	cond := corev1.ConditionFalse
	reason, msg := "ContainersNotReady", "containers with unready status: [echo]"
	if ready {
		cond, reason, msg = corev1.ConditionTrue, "", ""
	}
	return k.updateStatus(ctx, pod.Namespace, pod.Name, func(p *corev1.Pod) {
		now := metav1.Now()
		p.Status.Phase = corev1.PodRunning
		p.Status.HostIP = k.cfg.NodeIP
		p.Status.HostIPs = []corev1.HostIP{{IP: k.cfg.NodeIP}}
		p.Status.PodIPs = nil
		for _, ip := range sb.ips {
			p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
		}
		if len(sb.ips) > 0 {
			p.Status.PodIP = sb.ips[0]
		}
		if p.Status.StartTime == nil {
			p.Status.StartTime = &now
		}
		p.Status.Conditions = []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: cond, Reason: reason, Message: msg, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: cond, Reason: reason, Message: msg, LastTransitionTime: now},
		}
	})
}

// probeFailedEvent records a failed readiness probe as the real kubelet
// does (reason Unhealthy), so that the pod's events say why it is not Ready.
func (k *Kubelet) probeFailedEvent(ctx context.Context, pod *corev1.Pod, why string) {
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: pod.Name + ".", Namespace: pod.Namespace},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID,
			APIVersion: "v1", FieldPath: "spec.containers{echo}"},
		Reason:         "Unhealthy",
		Message:        "Readiness probe failed: " + why,
		Type:           corev1.EventTypeWarning,
		Source:         corev1.EventSource{Component: "kubelet", Host: k.cfg.NodeName},
		FirstTimestamp: now,
		LastTimestamp:  now,
		Count:          1,
	}
	if _, err := k.client.CoreV1().Events(pod.Namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil && ctx.Err() == nil {
		k.log.Warn("recording probe failure event", "pod", pod.Namespace+"/"+pod.Name, "err", err)
	}
}

func (k *Kubelet) updateStatus(ctx context.Context, ns, name string, mutate func(*corev1.Pod)) error {
	for range 5 {
		p, err := k.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		mutate(p)
		_, err = k.client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		if !apierrors.IsConflict(err) {
			return err
		}
	}
	return errors.New("status update: too many conflicts")
}

// terminate drains and removes a deleting pod, then deletes the object.
func (k *Kubelet) terminate(ctx context.Context, key string, pod *corev1.Pod, sb *sandbox) error {
	if sb != nil {
		if sb.stopProbe != nil {
			sb.stopProbe()
		}
		k.mu.Lock()
		wasReady := sb.ready
		sb.ready = false
		k.mu.Unlock()
		if wasReady {
			if err := k.writeStatus(ctx, pod, sb); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			select {
			case <-time.After(k.cfg.DrainDelay):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err := k.teardown(ctx, key, sb); err != nil {
			return err
		}
	}
	zero := int64(0)
	err := k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// teardown stops the workload, runs CNI DEL and removes the netns.
func (k *Kubelet) teardown(ctx context.Context, key string, sb *sandbox) error {
	if sb.stopProbe != nil {
		sb.stopProbe()
	}
	if sb.workload != nil && sb.workload.Process != nil {
		_ = syscall.Kill(-sb.workload.Process.Pid, syscall.SIGKILL)
	}
	list, err := k.confList()
	if err != nil {
		return err
	}
	// DEL needs the same pod identity as ADD; the netns may already be gone.
	rt := &libcni.RuntimeConf{ContainerID: sb.containerID, NetNS: "/run/netns/" + sb.netns, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}}}
	if err := k.cni.DelNetworkList(ctx, list, rt); err != nil {
		return fmt.Errorf("CNI DEL: %w", err)
	}
	if err := k.removeNetns(sb.netns); err != nil {
		return err
	}
	_ = os.RemoveAll(filepath.Join("/etc/netns", sb.netns))
	k.mu.Lock()
	delete(k.sandboxes, key)
	k.mu.Unlock()
	k.log.Info("pod network removed", "pod", key)
	return nil
}

func (k *Kubelet) removeNetns(name string) error {
	if _, err := os.Stat("/run/netns/" + name); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if out, err := netnsCommand(context.Background(), "del", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns del %s: %v: %s", name, err, out)
	}
	return nil
}

// netnsCommand runs `ip netns <verb> <name>` in the sandbox's root mount
// namespace. The kubelet itself runs under `ip netns exec <node>`, which
// gives it a slave mount namespace: a netns bind mount made there would not
// propagate back, and the tests, the agent and `ip netns exec` elsewhere
// would not see the pod. PID 1 of the sandbox lives in the root mount
// namespace, as a container runtime on a real node lives in the host's.
func netnsCommand(ctx context.Context, verb, name string) *exec.Cmd {
	self, _ := os.Readlink("/proc/self/ns/mnt")
	root, _ := os.Readlink("/proc/1/ns/mnt")
	if self != "" && root != "" && self != root {
		return exec.CommandContext(ctx, "nsenter", "--mount=/proc/1/ns/mnt", "--", "ip", "netns", verb, name)
	}
	return exec.CommandContext(ctx, "ip", "netns", verb, name)
}

func randomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

var _ cnitypes.Result = (*current.Result)(nil)
