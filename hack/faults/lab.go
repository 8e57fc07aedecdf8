package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// Host names of the two simulated dom0s; A is the source of every cell.
const (
	hostA = "dom0-a"
	hostB = "dom0-b"
)

// Controller and agent timings: short, so that a lost agent is noticed in
// seconds, yet well above what a loaded 2-core machine needs for one
// heartbeat (the agents heartbeat every second).
const (
	heartbeatTimeout = 8 * time.Second
	abortGrace       = 20 * time.Second
)

// lab is one run's hosts, control plane, controller and agents.
type lab struct {
	root, work, bin string
	log             func(format string, args ...any)
	ps              *labkit.Procs
	net             *network
	cp              *labkit.ControlPlane
	c               client.Client
	agentKC         map[string]string // kubeconfig of each host's agent
	rootKC          string            // the controller's (admin)
	controller      *labkit.Proc
	agents          map[string]*agent
	proxy           *faultProxy
	creds           peerCreds
	cancelFwd       context.CancelFunc
}

// agent is one node agent process and what it was started with.
type agent struct {
	host      string
	p         *labkit.Proc
	id        string // XenHost status.agentID of this process
	cfg       string
	stateDir  string
	fpFile    string // XENFERRY_FAILPOINTS_FILE
	hitDir    string // XENFERRY_FAILPOINTS_DIR
	dataAddr  string
	advertise string
}

// up starts everything but the agents: network, control plane, CRDs, the
// API forwarder, the controller and the fault proxy.
func (l *lab) up(ctx context.Context) error {
	var err error
	if l.net, err = setupNetwork(ctx, []string{hostA, hostB}); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	l.log("network: hub %s, %s in %s (%s), %s in %s (%s)", l.net.hub, hostA, l.net.hosts[hostA].ns, l.net.hosts[hostA].addr,
		hostB, l.net.hosts[hostB].ns, l.net.hosts[hostB].addr)
	binDir := filepath.Join(l.root, "bin")
	t0 := time.Now()
	var users []labkit.APIUser
	for _, h := range []string{hostA, hostB} {
		name, groups := l.creds.apiIdentity(h)
		users = append(users, labkit.APIUser{Name: name, Groups: groups})
	}
	if l.cp, err = labkit.StartControlPlane(ctx, l.ps, labkit.ControlPlaneConfig{BinDir: binDir,
		Dir: filepath.Join(l.work, "controlplane"), Users: users, Env: cleanEnv()}); err != nil {
		return fmt.Errorf("control plane: %w", err)
	}
	l.log("control plane ready in %.1fs on 127.0.0.1:%d", time.Since(t0).Seconds(), l.cp.Port)
	rc := l.cp.RESTConfig()
	if err := labkit.InstallCRDs(rc, l.root); err != nil {
		return fmt.Errorf("install CRDs: %w", err)
	}
	scheme, err := labkit.Scheme()
	if err != nil {
		return err
	}
	if l.c, err = client.New(rc, client.Options{Scheme: scheme}); err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	// The agents reach the API server through a forwarder in the hub.
	ln, err := listenIn(l.net.hub, net.JoinHostPort(hubAddr, "6443"))
	if err != nil {
		return fmt.Errorf("API forwarder: %w", err)
	}
	fctx, cancel := context.WithCancel(context.Background())
	l.cancelFwd = cancel
	go forward(fctx, ln, fmt.Sprintf("127.0.0.1:%d", l.cp.Port))
	l.rootKC = filepath.Join(l.work, "root.kubeconfig")
	if err := l.cp.Kubeconfig(l.rootKC, l.cp.URL(), ""); err != nil {
		return err
	}
	l.agentKC = map[string]string{}
	for _, h := range []string{hostA, hostB} {
		name, _ := l.creds.apiIdentity(h)
		l.agentKC[h] = filepath.Join(l.work, h+".kubeconfig")
		if err := l.cp.Kubeconfig(l.agentKC[h], "https://"+net.JoinHostPort(hubAddr, "6443"), name); err != nil {
			return err
		}
	}
	if err := l.startController(); err != nil {
		return err
	}
	// Agents' data addresses: the proxy (for the cells that put it on the
	// path) listens in the hub and forwards to the target agent.
	for _, h := range []string{hostA, hostB} {
		nh := l.net.hosts[h]
		l.agents[h] = &agent{host: h, dataAddr: net.JoinHostPort(nh.addr, fmt.Sprint(dataPort))}
	}
	if l.proxy, err = newFaultProxy(l.net.hub, net.JoinHostPort(hubAddr, "7100"), l.agents[hostB].dataAddr); err != nil {
		return fmt.Errorf("fault proxy: %w", err)
	}
	return nil
}

func (l *lab) startController() error {
	args := append([]string{"--kubeconfig", l.rootKC, "--metrics-bind-address", "0", "--health-probe-bind-address", "0",
		"--heartbeat-timeout", heartbeatTimeout.String(), "--abort-grace", abortGrace.String(),
		// Hostile cells hold victim migrations open beside a normal one.
		"--max-migrations", "16", "--max-outbound-per-host", "8", "--max-inbound-per-host", "8"}, l.creds.controllerArgs()...)
	p, err := l.ps.Start("controller", cleanEnv(), filepath.Join(l.bin, labkit.ControllerBin), args...)
	if err != nil {
		return err
	}
	l.controller = p
	return nil
}

// down stops every process and removes the namespaces; safe to call twice.
func (l *lab) down() {
	if l.proxy != nil {
		l.proxy.close()
	}
	if l.ps != nil {
		l.ps.StopAll()
	}
	l.simDestroy()
	if l.cancelFwd != nil {
		l.cancelFwd()
	}
	if l.net != nil {
		// sim-destroy ended the registered guests; any left (a guest
		// that never registered) is still ours: it lives in our namespaces.
		for _, h := range l.net.hosts {
			if ino, err := netnsInode(h.ns); err == nil {
				for _, g := range findGuests("", ino) {
					killQuiet(g.PID)
				}
			}
		}
		l.net.teardown(context.Background())
		l.net = nil
	}
}

// domSpec is one simulated domain of a host configuration.
type domSpec struct {
	name   string
	memMiB int
	seed   int
	dirty  float64 // MiB/s, all into the hot set
}

// writeSimConfig writes a host's sim configuration. Disks live in one
// directory both hosts use: the shared storage.
func (l *lab) writeSimConfig(path, host string, doms []domSpec) error {
	var b strings.Builder
	fmt.Fprintf(&b, "name: %s\nmemory: 1Gi\ncpus: 2\nstateDir: %s\ndomains:", host, filepath.Join(l.work, "disks"))
	if len(doms) == 0 {
		b.WriteString(" []\n")
	}
	for _, d := range doms {
		// hotWriteShare 1: every guest write lands in the hot set, so the
		// other pages never change (see wrongPages).
		fmt.Fprintf(&b, `
- name: %s
  namespace: default
  memory: %dMi
  vcpus: 1
  disks: [{id: xvda, path: %s.img, size: %dMi}]
  profile: {zero: 0.25, disk: 0.35, dirtyMiBps: %g, hotFraction: 0.0625, hotWriteShare: 1, readMiBps: 4, seed: %d}
`, d.name, d.memMiB, d.name, d.memMiB+16, d.dirty, d.seed)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// startAgent starts (or restarts) host's agent with configuration cfg;
// advertise, if set, is published instead of the listener's address.
func (l *lab) startAgent(ctx context.Context, host, cfg, advertise string) error {
	a := l.agents[host]
	if a.p != nil && a.p.Alive() {
		return fmt.Errorf("agent %s still runs", host)
	}
	a.cfg, a.advertise = cfg, advertise
	dir := filepath.Join(filepath.Dir(cfg), host)
	a.stateDir, a.fpFile, a.hitDir = filepath.Join(dir, "state"), filepath.Join(dir, "failpoints"), filepath.Join(dir, "hits")
	for _, d := range []string{a.stateDir, a.hitDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	args := []string{"run", "--kubeconfig", l.agentKC[host], "--backend", "sim", "--sim-config", cfg,
		"--data-addr", a.dataAddr, "--state-dir", a.stateDir, "--heartbeat-interval", "1s", "--status-interval", "500ms"}
	if advertise != "" {
		args = append(args, "--advertise-addr", advertise)
	}
	args = append(args, l.creds.agentArgs(host)...)
	prev := a.id
	// ip netns exec enters the host's namespace and execs the agent: the
	// pid is the agent's.
	p, err := l.ps.Start("agent-"+host, cleanEnv("XENFERRY_FAILPOINTS_FILE="+a.fpFile, "XENFERRY_FAILPOINTS_DIR="+a.hitDir),
		"ip", append([]string{"netns", "exec", l.net.hosts[host].ns, filepath.Join(l.bin, labkit.AgentBin)}, args...)...)
	if err != nil {
		return err
	}
	a.p = p
	// Registered: the XenHost names a new agent process with a fresh heartbeat.
	return waitFor(ctx, 90*time.Second, 200*time.Millisecond, func() (bool, error) {
		if !p.Alive() {
			return false, fmt.Errorf("agent %s exited: %s", host, p.Tail(800))
		}
		h := &v1.XenHost{}
		if err := l.c.Get(ctx, types.NamespacedName{Name: host}, h); err != nil {
			return false, client.IgnoreNotFound(err)
		}
		if h.Status.AgentID == "" || h.Status.AgentID == prev || h.Status.HeartbeatTime == nil ||
			time.Since(h.Status.HeartbeatTime.Time) > 3*time.Second {
			return false, nil
		}
		a.id = h.Status.AgentID
		return true, nil
	})
}

// stopAgents stops both agents; their guests live on (see resetHosts).
func (l *lab) stopAgents() {
	for _, a := range l.agents {
		if a.p != nil {
			a.p.Stop(5 * time.Second)
		}
	}
}

// resetHosts stops both agents and ends the guests registered under their
// state dirs: sim guests outlive their agent (as domUs outlive dom0's
// agent), so a cell's guests are ended explicitly before the next cell.
func (l *lab) resetHosts() {
	l.stopAgents()
	l.simDestroy()
}

// simDestroy runs `node-agent sim-destroy` on every agent's state dir.
func (l *lab) simDestroy() {
	for _, a := range l.agents {
		if a.stateDir == "" {
			continue
		}
		out, err := exec.Command(filepath.Join(l.bin, labkit.AgentBin), "sim-destroy", "--state-dir", a.stateDir).CombinedOutput()
		if err != nil {
			l.log("sim-destroy %s: %v: %s", a.stateDir, err, strings.TrimSpace(string(out)))
		}
	}
}

// setFailpoints replaces an agent's failpoint file (read on each use).
func (a *agent) setFailpoints(spec string) error {
	return os.WriteFile(a.fpFile, []byte(spec+"\n"), 0o644)
}

// hit reports whether the agent reached failpoint name.
func (a *agent) hit(name string) bool {
	_, err := os.Stat(filepath.Join(a.hitDir, name+".hit"))
	return err == nil
}

// hits counts how often the agent reached failpoint name.
func (a *agent) hits(name string) int {
	b, err := os.ReadFile(filepath.Join(a.hitDir, name+".hit"))
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "\n")
}

// waitDomain waits until the XenDomain of a domain is published by host.
func (l *lab) waitDomain(ctx context.Context, name, host string) error {
	return waitFor(ctx, 60*time.Second, 200*time.Millisecond, func() (bool, error) {
		xd := &v1.XenDomain{}
		if err := l.c.Get(ctx, types.NamespacedName{Namespace: "default", Name: name}, xd); err != nil {
			return false, client.IgnoreNotFound(err)
		}
		return xd.Status.Host == host, nil
	})
}

// getMig reads a migration, uncached.
func (l *lab) getMig(ctx context.Context, name string) (*v1.VMMigration, error) {
	m := &v1.VMMigration{}
	err := l.c.Get(ctx, types.NamespacedName{Namespace: "default", Name: name}, m)
	return m, err
}

// waitFor polls cond every step until it is true, fails, or limit passes;
// it retries the API errors labkit.IsTransient accepts.
func waitFor(ctx context.Context, limit, step time.Duration, cond func() (bool, error)) error {
	return labkit.WaitFor(ctx, limit, step, labkit.IsTransient, cond)
}
