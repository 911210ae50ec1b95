// Package cp owns the lab's real Kubernetes control plane: it builds the
// knit-controlplane binary (the nested module knit.dev/knit/lab/controlplane,
// upstream etcd, kube-apiserver, kube-controller-manager and kube-proxy at
// pinned versions), writes the cluster's PKI and kubeconfigs, and runs and
// supervises the processes for end-to-end tests, the demo and benchmarks.
//
// Start brings the cluster up in order, each step waiting for the previous
// one to be healthy:
//
//	PKI + kubeconfigs (Options.Dir)
//	  -> etcd                    http://127.0.0.1:2379 (data in Dir/etcd)
//	  -> kube-apiserver          https://<advertise>:6443, RBAC, waits for /readyz
//	  -> kube-controller-manager nodeipam (podCIDRs), endpointslice(+mirroring),
//	                             serviceaccount(+token), namespace, garbagecollector
//
// The API server binds every address of the network namespace it runs in, so
// Start refuses to run outside a sandbox (knit.dev/knit/lab/sandbox).
// Processes are children of the caller: they get SIGTERM, then SIGKILL after a
// grace period, on Stop or when Start's context ends, and SIGKILL if the
// caller dies. Each one's stdout and stderr go to Dir/<name>.log.
package cp

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/rest"

	"knit.dev/knit/lab/sandbox"
)

// Options configures Start. Zero fields take the lab defaults (DESIGN.md,
// "The lab").
type Options struct {
	// Dir holds etcd data, PKI, kubeconfigs and logs. Required.
	Dir string
	// BinPath is the knit-controlplane binary (see Build). Required.
	BinPath string
	// AdvertiseAddress is the API server's address for clients and for the
	// kubernetes Service's endpoints. It must not be a loopback address.
	// Default sandbox.ControlPlaneIP (198.18.0.254).
	AdvertiseAddress string
	// BindAddress is where the API server listens. Default 0.0.0.0, which
	// also serves 127.0.0.1; only ever inside the sandbox.
	BindAddress string
	// ServiceCIDR is the Service ClusterIP range. Default 10.43.0.0/16.
	ServiceCIDR string
	// ClusterCIDR is the pod range nodeipam cuts per-node podCIDRs from.
	// Default 10.42.0.0/16.
	ClusterCIDR string
	// NodeCIDRMaskSize is the per-node podCIDR prefix length. Default 24.
	NodeCIDRMaskSize int
	// APIServerPort is the API server's secure port. Default 6443.
	APIServerPort int
	// EtcdClientPort and EtcdPeerPort are etcd's ports on 127.0.0.1.
	// Defaults 2379 and 2380.
	EtcdClientPort, EtcdPeerPort int
	// ControllerManagerPort is kube-controller-manager's secure (health)
	// port on 127.0.0.1. Default 10257.
	ControllerManagerPort int
	// StopGrace is how long a process gets between SIGTERM and SIGKILL.
	// Default 10s.
	StopGrace time.Duration
	// Logger receives progress logs. Default slog.Default().
	Logger *slog.Logger
}

func (o *Options) defaults() error {
	if o.Dir == "" || o.BinPath == "" {
		return errors.New("cp: Options.Dir and Options.BinPath are required")
	}
	setDefault(&o.AdvertiseAddress, sandbox.ControlPlaneIP)
	setDefault(&o.BindAddress, "0.0.0.0")
	setDefault(&o.ServiceCIDR, "10.43.0.0/16")
	setDefault(&o.ClusterCIDR, "10.42.0.0/16")
	setDefault(&o.NodeCIDRMaskSize, 24)
	setDefault(&o.APIServerPort, 6443)
	setDefault(&o.EtcdClientPort, 2379)
	setDefault(&o.EtcdPeerPort, 2380)
	setDefault(&o.ControllerManagerPort, 10257)
	setDefault(&o.StopGrace, 10*time.Second)
	setDefault(&o.Logger, slog.Default())
	if a, err := netip.ParseAddr(o.AdvertiseAddress); err != nil || a.IsLoopback() {
		return fmt.Errorf("cp: AdvertiseAddress %q must be a non-loopback IP (the API server rejects loopback)", o.AdvertiseAddress)
	}
	return nil
}

func setDefault[T comparable](p *T, v T) {
	var zero T
	if *p == zero {
		*p = v
	}
}

// ControlPlane is a running lab control plane. Its methods are safe for
// concurrent use.
type ControlPlane struct {
	opts       Options
	log        *slog.Logger
	ctx        context.Context // lifetime of all processes
	cancel     context.CancelFunc
	pki        *pki
	admin      keyPair
	kubeconfig string
	server     string // https://<advertise>:<port>

	mu    sync.Mutex
	procs map[string]*process // running processes by name
}

// Process names, also the knit-controlplane subcommands and log file stems.
const (
	Etcd              = "etcd"
	APIServer         = "kube-apiserver"
	ControllerManager = "kube-controller-manager"
)

// Start writes the PKI and starts etcd, kube-apiserver and
// kube-controller-manager, returning when all three are healthy. The
// processes live until Stop or until ctx is done. On error, whatever was
// started is stopped again.
func Start(ctx context.Context, opts Options) (*ControlPlane, error) {
	if err := sandbox.Check(); err != nil {
		return nil, fmt.Errorf("cp: the API server listens on non-loopback addresses: %w", err)
	}
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, err
	}
	pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c := &ControlPlane{
		opts:   opts,
		log:    opts.Logger.With("component", "lab-controlplane"),
		ctx:    pctx,
		cancel: cancel,
		server: "https://" + net.JoinHostPort(opts.AdvertiseAddress, strconv.Itoa(opts.APIServerPort)),
		procs:  map[string]*process{},
	}
	// Processes outlive a successful Start but not ctx.
	stopOnDone := context.AfterFunc(ctx, c.Stop)
	ok := false
	defer func() {
		if !ok {
			stopOnDone()
			c.Stop()
		}
	}()

	start := time.Now()
	if err := c.writePKI(); err != nil {
		return nil, fmt.Errorf("cp: writing PKI: %w", err)
	}
	if err := c.startEtcd(ctx); err != nil {
		return nil, err
	}
	if err := c.StartAPIServer(ctx); err != nil {
		return nil, err
	}
	if err := c.startControllerManager(ctx); err != nil {
		return nil, err
	}
	c.log.Info("control plane ready", "server", c.server, "kubeconfig", c.kubeconfig, "took", time.Since(start).Round(time.Millisecond))
	ok = true
	return c, nil
}

// path returns a file name under Options.Dir.
func (c *ControlPlane) path(name string) string { return filepath.Join(c.opts.Dir, name) }

func (c *ControlPlane) writePKI() error {
	p, err := newPKI()
	if err != nil {
		return err
	}
	c.pki = p
	svcPrefix, err := netip.ParsePrefix(c.opts.ServiceCIDR)
	if err != nil {
		return fmt.Errorf("ServiceCIDR: %w", err)
	}
	// The kubernetes Service gets the first address of the range.
	kubernetesSvcIP := svcPrefix.Masked().Addr().Next()
	serving, err := p.issue("kube-apiserver", nil,
		[]net.IP{net.ParseIP(c.opts.AdvertiseAddress), net.IPv4(127, 0, 0, 1), net.IP(kubernetesSvcIP.AsSlice())},
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"})
	if err != nil {
		return err
	}
	if c.admin, err = p.issue("knit-lab-admin", []string{"system:masters"}, nil, nil); err != nil {
		return err
	}
	// kube-controller-manager authenticates as itself, as kubeadm sets it up;
	// with --use-service-account-credentials each controller then uses its
	// own service account and bootstrap RBAC role.
	kcm, err := p.issue("system:kube-controller-manager", nil, nil, nil)
	if err != nil {
		return err
	}
	saKey, saPub, err := serviceAccountKey()
	if err != nil {
		return err
	}
	c.kubeconfig = c.path("admin.kubeconfig")
	return writeFiles(c.opts.Dir, map[string][]byte{
		"ca.crt":                             p.caPEM,
		"apiserver.crt":                      serving.cert,
		"apiserver.key":                      serving.key,
		"sa.key":                             saKey,
		"sa.pub":                             saPub,
		"admin.kubeconfig":                   kubeconfig(c.server, p.caPEM, "knit-lab-admin", c.admin),
		"kube-controller-manager.kubeconfig": kubeconfig(c.server, p.caPEM, "system:kube-controller-manager", kcm),
	})
}

// ClientKubeconfig issues a client certificate for user in groups, signed by
// the cluster CA, writes a kubeconfig for it to Dir/<user>.kubeconfig (colons
// replaced) and returns its path. Use it to run components with least
// privilege, e.g. ClientKubeconfig("system:kube-proxy") or a knit agent's
// own identity bound by a test's RBAC objects.
func (c *ControlPlane) ClientKubeconfig(user string, groups ...string) (string, error) {
	kp, err := c.pki.issue(user, groups, nil, nil)
	if err != nil {
		return "", err
	}
	path := c.path(strings.ReplaceAll(user, ":", "-") + ".kubeconfig")
	return path, os.WriteFile(path, kubeconfig(c.server, c.pki.caPEM, user, kp), 0o600)
}

// Kubeconfig returns the path of the admin kubeconfig (user in
// system:masters, server https://<advertise>:<port>).
func (c *ControlPlane) Kubeconfig() string { return c.kubeconfig }

// RestConfig returns a new admin client configuration.
func (c *ControlPlane) RestConfig() *rest.Config {
	return &rest.Config{
		Host: c.server,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   c.pki.caPEM,
			CertData: c.admin.cert,
			KeyData:  c.admin.key,
		},
		QPS:   100,
		Burst: 200,
	}
}

// Server returns the API server URL, https://<advertise>:<port>.
func (c *ControlPlane) Server() string { return c.server }

// CAFile returns the path of the cluster CA certificate.
func (c *ControlPlane) CAFile() string { return c.path("ca.crt") }

// LogPaths returns each process's log file by process name. The files are
// appended to across restarts.
func (c *ControlPlane) LogPaths() map[string]string {
	return map[string]string{
		Etcd:              c.path(Etcd + ".log"),
		APIServer:         c.path(APIServer + ".log"),
		ControllerManager: c.path(ControllerManager + ".log"),
	}
}

func (c *ControlPlane) startEtcd(ctx context.Context) error {
	client := fmt.Sprintf("http://127.0.0.1:%d", c.opts.EtcdClientPort)
	peer := fmt.Sprintf("http://127.0.0.1:%d", c.opts.EtcdPeerPort)
	args := []string{
		"--name=knit-lab",
		"--data-dir=" + c.path("etcd"),
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=knit-lab=" + peer,
		// A throwaway lab cluster: durability is worth less than write
		// latency when benchmarks create 10,000 Services.
		"--unsafe-no-fsync",
		"--log-level=warn",
	}
	p, err := c.startProcess(Etcd, args)
	if err != nil {
		return err
	}
	return c.waitHealthy(ctx, p, 2*time.Minute, http.DefaultClient, client+"/health")
}

// StartAPIServer starts kube-apiserver on the existing etcd and waits (bounded
// by ctx and three minutes: the lab machine is shared and loaded) for /readyz. Start calls it; fault tests call it
// after StopAPIServer.
func (c *ControlPlane) StartAPIServer(ctx context.Context) error {
	o := c.opts
	args := []string{
		"--advertise-address=" + o.AdvertiseAddress,
		"--bind-address=" + o.BindAddress,
		"--secure-port=" + strconv.Itoa(o.APIServerPort),
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", o.EtcdClientPort),
		"--service-cluster-ip-range=" + o.ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--client-ca-file=" + c.path("ca.crt"),
		"--tls-cert-file=" + c.path("apiserver.crt"),
		"--tls-private-key-file=" + c.path("apiserver.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + c.path("sa.pub"),
		"--service-account-signing-key-file=" + c.path("sa.key"),
		"--allow-privileged=true",
		"--profiling=false",
		"--shutdown-watch-termination-grace-period=2s",
	}
	p, err := c.startProcess(APIServer, args)
	if err != nil {
		return err
	}
	hc, err := c.adminHTTPClient()
	if err != nil {
		return err
	}
	url := fmt.Sprintf("https://127.0.0.1:%d/readyz", o.APIServerPort)
	return c.waitHealthy(ctx, p, 3*time.Minute, hc, url)
}

// StopAPIServer stops kube-apiserver (SIGTERM, then SIGKILL after
// StopGrace), leaving etcd and kube-controller-manager running.
func (c *ControlPlane) StopAPIServer() { c.stopProcess(APIServer) }

// RestartControllerManager stops and starts kube-controller-manager. Fault
// tests call it after an API server outage: its client-go reflectors back
// off the default way and stay blind for a minute or more after the server
// is back (55-93 s measured in the lab), which the tests that follow should
// not have to wait out.
func (c *ControlPlane) RestartControllerManager(ctx context.Context) error {
	c.stopProcess(ControllerManager)
	return c.startControllerManager(ctx)
}

func (c *ControlPlane) startControllerManager(ctx context.Context) error {
	o := c.opts
	kc := c.path("kube-controller-manager.kubeconfig")
	args := []string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--controllers=nodeipam,endpointslice,endpointslicemirroring,serviceaccount,serviceaccount-token,namespace,garbagecollector",
		"--allocate-node-cidrs",
		"--cluster-cidr=" + o.ClusterCIDR,
		"--node-cidr-mask-size=" + strconv.Itoa(o.NodeCIDRMaskSize),
		"--service-cluster-ip-range=" + o.ServiceCIDR,
		"--root-ca-file=" + c.path("ca.crt"),
		"--service-account-private-key-file=" + c.path("sa.key"),
		"--use-service-account-credentials=true",
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(o.ControllerManagerPort),
		"--profiling=false",
	}
	p, err := c.startProcess(ControllerManager, args)
	if err != nil {
		return err
	}
	// Its serving certificate is self-signed in memory; /healthz is open to
	// anonymous clients.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	url := fmt.Sprintf("https://127.0.0.1:%d/healthz", o.ControllerManagerPort)
	return c.waitHealthy(ctx, p, 3*time.Minute, hc, url)
}

func (c *ControlPlane) adminHTTPClient() (*http.Client, error) {
	cert, err := tls.X509KeyPair(c.admin.cert, c.admin.key)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.pki.caPEM)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:      pool,
		Certificates: []tls.Certificate{cert},
	}}}, nil
}

// waitHealthy polls url until it answers 200, the process exits, ctx ends or
// timeout passes.
func (c *ControlPlane) waitHealthy(ctx context.Context, p *process, timeout time.Duration, hc *http.Client, url string) error {
	name := p.name
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	var last string
	for {
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		req, _ := http.NewRequestWithContext(rctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				rcancel()
				c.log.Info("process healthy", "name", name, "took", time.Since(start).Round(time.Millisecond))
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, body)
		} else {
			last = err.Error()
		}
		rcancel()
		select {
		case <-p.done:
			return fmt.Errorf("cp: %s exited while starting (%v); see %s", name, p.err, p.logPath)
		case <-ctx.Done():
			return fmt.Errorf("cp: %s not healthy at %s after %s (last: %s); see %s", name, url, time.Since(start).Round(time.Second), last, p.logPath)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// process is one running child.
type process struct {
	name    string
	cmd     *exec.Cmd
	cancel  context.CancelFunc
	logPath string
	done    chan struct{} // closed after Wait returns
	err     error         // Wait's result, valid after done
}

func (c *ControlPlane) startProcess(name string, args []string) (*process, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx.Err() != nil {
		return nil, fmt.Errorf("cp: control plane stopped")
	}
	if _, running := c.procs[name]; running {
		return nil, fmt.Errorf("cp: %s is already running", name)
	}
	logPath := c.path(name + ".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logFile, "=== %s knit-controlplane %s %s\n", time.Now().Format(time.RFC3339), name, strings.Join(args, " "))

	pctx, cancel := context.WithCancel(c.ctx)
	cmd := exec.CommandContext(pctx, c.opts.BinPath, append([]string{name}, args...)...)
	cmd.Dir = c.opts.Dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// SIGTERM first so etcd and the API server shut down cleanly; Wait
	// escalates to SIGKILL after WaitDelay.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = c.opts.StopGrace
	// Die with the caller even if it is killed without running Stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		cancel()
		logFile.Close()
		return nil, fmt.Errorf("cp: starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, cancel: cancel, logPath: logPath, done: make(chan struct{})}
	c.procs[name] = p
	c.log.Info("process started", "name", name, "pid", cmd.Process.Pid, "log", logPath)
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
		c.mu.Lock()
		if c.procs[name] == p {
			delete(c.procs, name)
		}
		c.mu.Unlock()
		if pctx.Err() == nil {
			c.log.Warn("process exited unexpectedly", "name", name, "err", p.err, "log", logPath)
		} else {
			c.log.Info("process stopped", "name", name, "exit", cmd.ProcessState.String())
		}
	}()
	return p, nil
}

// stopProcess stops name if it runs and waits for it to exit.
func (c *ControlPlane) stopProcess(name string) {
	c.mu.Lock()
	p := c.procs[name]
	c.mu.Unlock()
	if p == nil {
		return
	}
	start := time.Now()
	p.cancel()
	<-p.done
	c.log.Debug("stop took", "name", name, "took", time.Since(start).Round(time.Millisecond))
}

// Stop stops all processes, in reverse start order, and waits for them. It is
// idempotent. Dir is left in place (logs, etcd data).
func (c *ControlPlane) Stop() {
	c.stopProcess(ControllerManager)
	c.stopProcess(APIServer)
	c.stopProcess(Etcd)
	c.cancel()
}
