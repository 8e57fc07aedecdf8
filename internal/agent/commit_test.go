package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// cutProxy forwards data connections to an agent and cuts all of them the
// moment the destination sends a control message of kind cutAt (a link
// failure at that exact point of the protocol).
type cutProxy struct {
	ln     net.Listener
	target atomic.Value // string: the agent's listener
	cutAt  string
	// dial, if set, opens the connection to the agent (a TLS client with
	// the source host's certificate when the agents speak mTLS).
	dial  func(addr string) (net.Conn, error)
	mu    sync.Mutex
	conns []net.Conn
	cuts  atomic.Int32
}

func newCutProxy(t *testing.T, cutAt string) *cutProxy {
	return startCutProxy(t, cutAt, nil, nil)
}

// startCutProxy starts a cutProxy whose listener is wrap(a TCP listener)
// and which reaches the agent with dial (both nil: plain TCP).
func startCutProxy(t *testing.T, cutAt string, wrap func(net.Listener) net.Listener, dial func(addr string) (net.Conn, error)) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		ln = wrap(ln)
	}
	p := &cutProxy{ln: ln, cutAt: cutAt, dial: dial}
	t.Cleanup(func() { ln.Close(); p.cut() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			target, _ := p.target.Load().(string)
			dial := p.dial
			if dial == nil {
				dial = func(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }
			}
			out, err := dial(target)
			if err != nil {
				in.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, in, out)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(out, in); out.Close() }()
			go func() { p.back(in, out); in.Close() }()
		}
	}()
	return p
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// newCutProxyTLS is a cutProxy between two agents that speak mTLS: it
// terminates the source's connections with a certificate for the target
// host and opens its own to the target with one for the source host, both
// issued by the controller's CA (a man in the middle that holds the CA's
// key, which only a test may do), so that it can see the protocol.
func newCutProxyTLS(t *testing.T, cutAt, srcHost, dstHost string) *cutProxy {
	t.Helper()
	sec := &corev1.Secret{}
	waitFor(t, "the controller's CA", 20*time.Second, func() (bool, string) {
		err := k8s.Get(context.Background(), types.NamespacedName{Namespace: "xenferry-system", Name: "xenferry-ca"}, sec)
		return err == nil, fmt.Sprint(err)
	})
	ca, err := pki.LoadCA(sec.Data[corev1.TLSCertKey], sec.Data[corev1.TLSPrivateKeyKey])
	if err != nil {
		t.Fatalf("load the controller's CA: %v", err)
	}
	id := func(host string) pki.Source {
		certPEM, keyPEM, err := ca.IssueHost(host, nil, nil, time.Now(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		key, err := pki.ParseAgentKeyPEM(keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		ident := pki.NewIdentity(key)
		if err := ident.Set(certPEM, sec.Data[corev1.TLSCertKey]); err != nil {
			t.Fatal(err)
		}
		return ident
	}
	asTarget, asSource := id(dstHost), id(srcHost)
	dial := pki.Dialer(asSource, dstHost, 10*time.Second)
	return startCutProxy(t, cutAt, func(ln net.Listener) net.Listener { return pki.Listener(ln, asTarget) },
		func(addr string) (net.Conn, error) { return dial(context.Background(), addr) })
}

// back copies the destination's records to the source, re-framed, until
// the control message to cut at.
func (p *cutProxy) back(src, dst net.Conn) {
	r, w := wire.NewReader(dst), wire.NewWriter(src)
	if r.ReadStreamHeader() != nil || w.WriteStreamHeader() != nil || w.Flush() != nil {
		return
	}
	for {
		rec, err := r.Next()
		if err != nil {
			return
		}
		if rec.Type == wire.TypeControl {
			if m, err := wire.ParseControl(rec.Body); err == nil && m.Kind == p.cutAt {
				p.cuts.Add(1)
				p.cut()
				return
			}
		}
		if w.Write(rec.Type, rec.Body) != nil || w.Flush() != nil {
			return
		}
	}
}

// A stop-and-copy whose "resumed" reply is lost: before, the source agent
// closed its handle and the domain ran on both hosts. Now the source holds
// the domain paused (status.source.committed), and releases it once the
// target's own half says it runs the domain, whose memory it verified
// before go: the migration succeeds and the domain runs on one host.
func TestLostResumedThroughAgents(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	startController(t, ctrlOpts{heartbeat: 3 * time.Second, grace: 5 * time.Second})
	a := startAgent(t, ns+"-a", "1Gi", simDomain("web", ns, "32Mi", 4, sharedDisk(t, disks, "web"), 7))
	px := newCutProxyTLS(t, "resumed", a.name, ns+"-b")
	bHost, err := sim.NewHost(sim.Config{Name: ns + "-b", Memory: "1Gi", CPUs: 2, StateDir: t.TempDir()},
		testlog.New(t).WithName("sim-b"))
	if err != nil {
		t.Fatal(err)
	}
	b := &testAgent{name: ns + "-b", host: bHost, stateDir: t.TempDir(), advertise: px.ln.Addr().String()}
	b.start(t)
	px.target.Store(b.agent.ln.Addr().String())
	t.Cleanup(func() { b.stop(); bHost.Close(); deleteHost(t, b.name) })
	waitDomainOn(t, ns, "web", a.name, 10*time.Second)
	waitHost(t, b)

	create(t, migration(ns, "lost", "web", b.name, strategy(v1.StrategyPreCopy)))
	var sawCommitted bool
	waitFor(t, "the migration to end", 60*time.Second, func() (bool, string) {
		m := getMig(t, ns, "lost")
		if s := m.Status.Source; s != nil && s.Committed {
			sawCommitted = true
		}
		return m.Status.Phase.IsFinal(), describe(m)
	})
	m := getMig(t, ns, "lost")
	if px.cuts.Load() == 0 {
		t.Fatalf("the proxy never cut the link at resumed: the test proved nothing (%s)", describe(m))
	}
	if !sawCommitted {
		t.Error("status.source.committed was never reported")
	}
	if m.Status.Phase != v1.MigrationSucceeded {
		t.Fatalf("phase %s: %s", m.Status.Phase, describe(m))
	}
	noDomain(t, a, "web")
	domainRunning(t, b, "web")
}

// setHalves writes both halves of a migration's status as the agents and
// the controller would have; the test plays everyone but the agent under
// test.
func setHalves(t *testing.T, m *v1.VMMigration, phase v1.VMMigrationPhase, src *v1.SourceState, dst *v1.TargetState) {
	t.Helper()
	orig := m.DeepCopy()
	m.Status.Phase = phase
	m.Status.SourceHost, m.Status.TargetHost = src.Host, dst.Host
	m.Status.Source, m.Status.Target = src, dst
	if err := k8s.Status().Patch(context.Background(), m, client.MergeFrom(orig)); err != nil {
		t.Fatalf("patch status of %s: %v", m.Name, err)
	}
}

// A source agent that restarts while it holds a committed domain resolves
// its half from facts: the record it persisted before go, the domain paused
// on its host, and the target's half. It keeps the domain paused without a
// verdict, resumes it on the target's "discarded", and releases one the
// target runs after a verified stop-and-copy.
func TestRestartedAgentResolvesCommittedHalf(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	name := ns + "-a"
	// The host keeps its domains in the agent's state dir, so they
	// outlive the previous agent process and the new one adopts them.
	stateDir := t.TempDir()
	hostCfg := sim.Config{Name: name, Memory: "1Gi", CPUs: 2, StateDir: t.TempDir(),
		Domains: []sim.DomainSpec{simDomain("web", ns, "16Mi", 4, sharedDisk(t, disks, "web"), 8), simDomain("db", ns, "16Mi", 4, sharedDisk(t, disks, "db"), 9)}}
	simLog := testlog.New(t).WithName("sim-a")
	host, err := sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, host) }) // the host open at the end
	// The previous agent process paused and committed both domains (go
	// sent), persisted that, and died.
	for _, d := range []string{"web", "db"} {
		sd, err := host.OpenSource(context.Background(), d)
		if err != nil {
			t.Fatal(err)
		}
		if err := sd.Pause(); err != nil {
			t.Fatal(err)
		}
		if err := sd.Commit(); err != nil {
			t.Fatal(err)
		}
		if err := sd.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// The previous process goes (its guests stay); the new one adopts
	// them from the registry, committed and paused, and boots nothing.
	if err := host.Close(); err != nil {
		t.Fatal(err)
	}
	if host, err = sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog); err != nil {
		t.Fatal(err)
	}
	ta := &testAgent{name: name, host: host, stateDir: stateDir}
	ghost := ns + "-ghost"
	start := metav1.Now()
	half := func(phase string) *v1.SourceState {
		return &v1.SourceState{Host: name, AgentID: "previous-process", Phase: phase, StartTime: &start, Committed: true}
	}
	web := migration(ns, "web-away", "web", ghost)
	create(t, web)
	setHalves(t, web, v1.MigrationPostCopy, half("PostCopy"), &v1.TargetState{Host: ghost, AgentID: "ghost-agent", Resumed: true})
	db := migration(ns, "db-away", "db", ghost)
	create(t, db)
	setHalves(t, db, v1.MigrationStopAndCopy, half("StopAndCopy"), &v1.TargetState{Host: ghost, AgentID: "ghost-agent", Resumed: true})
	for _, rec := range []inflight{
		{UID: string(web.UID), Namespace: ns, Name: web.Name, Role: roleSourceName, Domain: "web", Committed: true, Phase: "PostCopy"},
		{UID: string(db.UID), Namespace: ns, Name: db.Name, Role: roleSourceName, Domain: "db", Committed: true, VerifiedBeforeGo: true, Phase: "StopAndCopy"},
	} {
		if err := writeInflight(ta.stateDir+"/migrations", rec); err != nil {
			t.Fatal(err)
		}
	}
	ta.start(t)
	t.Cleanup(func() { ta.stop(); destroyAll(t, host); host.Close(); deleteHost(t, name) })

	// db: the target runs it and verified every page before go: released.
	waitFor(t, "db released", 15*time.Second, func() (bool, string) {
		m := getMig(t, ns, "db-away")
		s := m.Status.Source
		return s != nil && s.Completed && s.AgentID == ta.agent.ID(), describe(m)
	})
	noDomain(t, ta, "db")

	// web: post-copy, the target resumed it but never said it verified
	// every page: the domain stays paused here.
	waitFor(t, "web adopted by the new agent", 15*time.Second, func() (bool, string) {
		m := getMig(t, ns, "web-away")
		s := m.Status.Source
		return s != nil && s.AgentID == ta.agent.ID() && s.Committed && strings.Contains(s.Message, "held paused"), describe(m)
	})
	d, ok := host.Domain("web")
	if !ok {
		t.Fatal("the restarted agent lost the committed domain")
	}
	time.Sleep(500 * time.Millisecond)
	if !d.Paused() || !d.Committed() {
		t.Fatalf("without a verdict the domain must stay paused and committed: paused=%v committed=%v", d.Paused(), d.Committed())
	}
	// The target reports that it destroyed its copy: the domain runs here again.
	m := getMig(t, ns, "web-away")
	setHalves(t, m, v1.MigrationPostCopy, m.Status.Source, &v1.TargetState{Host: ghost, AgentID: "ghost-agent", Resumed: true, Failed: true, Discarded: true,
		Message: "post-copy verification failed; destroyed here"})
	waitFor(t, "web reclaimed", 15*time.Second, func() (bool, string) {
		m := getMig(t, ns, "web-away")
		s := m.Status.Source
		return s != nil && s.Failed && strings.Contains(s.Message, "discarded"), describe(m)
	})
	domainRunning(t, ta, "web")
	if d.Committed() {
		t.Fatal("the reclaimed domain is still marked committed")
	}
	// Its record is closed; a later restart leaves the domain alone.
	rec, err := readInflight(ta.stateDir+"/migrations", string(web.UID))
	if err != nil || rec == nil || rec.Phase != phaseReclaimed {
		t.Fatalf("persisted record after the reclaim: %+v, %v", rec, err)
	}
}

// The source agent dies after pausing its domain for the stop-and-copy but
// before go, and the migration fails before a new agent process is up. The
// domain, adopted paused and uncommitted, runs nowhere else: the restarted
// agent resumes it instead of leaving it paused for ever.
func TestRestartedAgentResumesUncommittedAfterFinal(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	name := ns + "-a"
	stateDir := t.TempDir()
	hostCfg := sim.Config{Name: name, Memory: "1Gi", CPUs: 2, StateDir: t.TempDir(),
		Domains: []sim.DomainSpec{simDomain("web", ns, "16Mi", 4, sharedDisk(t, disks, "web"), 8)}}
	simLog := testlog.New(t).WithName("sim-a")
	host, err := sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, host) })
	// The previous process paused the domain for the switch-over (no
	// Commit: go was never sent) and died holding it.
	sd, err := host.OpenSource(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	if err := sd.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := host.Close(); err != nil {
		t.Fatal(err)
	}
	if host, err = sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog); err != nil {
		t.Fatal(err)
	}
	ta := &testAgent{name: name, host: host, stateDir: stateDir}
	ghost := ns + "-ghost"
	start := metav1.Now()
	web := migration(ns, "web-away", "web", ghost)
	create(t, web)
	setHalves(t, web, v1.MigrationFailed, &v1.SourceState{Host: name, AgentID: "previous-process", Phase: "StopAndCopy", StartTime: &start},
		&v1.TargetState{Host: ghost, AgentID: "ghost-agent", Failed: true, Message: "connection lost"})
	if err := writeInflight(ta.stateDir+"/migrations", inflight{UID: string(web.UID), Namespace: ns, Name: web.Name,
		Role: roleSourceName, Domain: "web", Phase: "StopAndCopy"}); err != nil {
		t.Fatal(err)
	}
	if d, ok := host.Domain("web"); !ok || !d.Paused() || d.Committed() {
		t.Fatalf("adopted domain: found=%v; want it paused and uncommitted", ok)
	}
	ta.start(t)
	t.Cleanup(func() { ta.stop(); destroyAll(t, host); host.Close(); deleteHost(t, name) })
	waitFor(t, "web resumed by the new agent", 15*time.Second, func() (bool, string) {
		d, ok := host.Domain("web")
		return ok && !d.Paused(), fmt.Sprintf("found=%v", ok)
	})
	domainRunning(t, ta, "web")
	waitFor(t, "record forgotten", 5*time.Second, func() (bool, string) {
		rec, err := readInflight(ta.stateDir+"/migrations", string(web.UID))
		return rec == nil && err == nil, fmt.Sprintf("%+v %v", rec, err)
	})
}

// The source agent dies during a post-copy before its durable mirror is
// complete. The restarted agent adopts the committed, paused domain and
// writes the whole mirror from it, so the target, whose source never
// reconnects, can finish from the mirror: every page of it equals the
// domain's memory and opens against the manifest.
func TestRestartedAgentRewritesDurableMirror(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	name := ns + "-a"
	stateDir, durable := t.TempDir(), t.TempDir()
	hostCfg := sim.Config{Name: name, Memory: "1Gi", CPUs: 2, StateDir: t.TempDir(),
		Domains: []sim.DomainSpec{simDomain("web", ns, "16Mi", 4, sharedDisk(t, disks, "web"), 8)}}
	simLog := testlog.New(t).WithName("sim-a")
	host, err := sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, host) })
	sd, err := host.OpenSource(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	if err := sd.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := sd.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := host.Close(); err != nil {
		t.Fatal(err)
	}
	if host, err = sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog); err != nil {
		t.Fatal(err)
	}
	ta := &testAgent{name: name, host: host, stateDir: stateDir, durable: durable}
	ghost := ns + "-ghost"
	start := metav1.Now()
	web := migration(ns, "web-away", "web", ghost)
	create(t, web)
	setHalves(t, web, v1.MigrationPostCopy, &v1.SourceState{Host: name, AgentID: "previous-process", Phase: "PostCopy", StartTime: &start, Committed: true},
		&v1.TargetState{Host: ghost, AgentID: "ghost-agent", Resumed: true})
	if err := writeInflight(ta.stateDir+"/migrations", inflight{UID: string(web.UID), Namespace: ns, Name: web.Name,
		Role: roleSourceName, Domain: "web", Committed: true, Phase: "PostCopy"}); err != nil {
		t.Fatal(err)
	}
	// A partial mirror of the previous process: no done file.
	pagesPath, _, _ := postcopy.MirrorPaths(durable, string(web.UID))
	if err := os.WriteFile(pagesPath, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	ta.start(t)
	t.Cleanup(func() { ta.stop(); destroyAll(t, host); host.Close(); deleteHost(t, name) })
	d, ok := host.Domain("web")
	if !ok {
		t.Fatal("the restarted agent lost the committed domain")
	}
	var mir *postcopy.OpenedMirror
	waitFor(t, "a complete mirror", 15*time.Second, func() (bool, string) {
		var err error
		mir, err = postcopy.OpenMirror(durable, string(web.UID), d.Info().MemoryBytes/xenmem.PageSize)
		return err == nil, fmt.Sprint(err)
	})
	defer mir.Close()
	if !d.Paused() || !d.Committed() {
		t.Fatalf("the domain must stay paused and committed: paused=%v committed=%v", d.Paused(), d.Committed())
	}
	mem := d.Memory()
	page := make([]byte, xenmem.PageSize)
	for p := uint64(0); p < uint64(len(mem))/xenmem.PageSize; p++ {
		if !mir.Has(p) {
			t.Fatalf("page %d missing from the mirror", p)
		}
		if err := mir.ReadPage(p, page); err != nil {
			t.Fatalf("page %d: %v", p, err)
		}
		if !bytes.Equal(page, mem[p*xenmem.PageSize:(p+1)*xenmem.PageSize]) {
			t.Fatalf("page %d of the mirror differs from the paused domain", p)
		}
	}
}

// destroyAll ends every domain of a host whose guests would outlive it.
func destroyAll(t *testing.T, h *sim.Host) {
	for _, info := range mustDomains(t, h) {
		sd, err := h.OpenSource(context.Background(), info.Name)
		if err != nil {
			continue
		}
		_ = sd.Release() // destroys, committed or not
		_ = sd.Close()
	}
}

func mustDomains(t *testing.T, h *sim.Host) []xenmem.DomainInfo {
	doms, err := h.Domains(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return doms
}

// The source agent dies during a post-copy (after go). Before, nothing
// configured the durable mirror and nothing remembered the migration: the
// domain was lost. Now the agents share a durable directory: the target
// finishes from the mirror, and the restarted source agent, finding its
// committed record and the domain paused, releases it once the target
// says it has every page verified. The migration succeeds.
func TestDurablePostCopySurvivesSourceAgentDeath(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks, shared := t.TempDir(), t.TempDir()
	startController(t, ctrlOpts{heartbeat: 15 * time.Second, grace: 10 * time.Second})
	newAgent := func(name string, doms ...sim.DomainSpec) *testAgent {
		host, err := sim.NewHost(sim.Config{Name: name, Memory: "1Gi", CPUs: 2, StateDir: t.TempDir(), Domains: doms},
			testlog.New(t).WithName("sim-"+name))
		if err != nil {
			t.Fatal(err)
		}
		ta := &testAgent{name: name, host: host, stateDir: t.TempDir(), durable: shared, recovery: 2 * time.Second}
		ta.start(t)
		t.Cleanup(func() { ta.stop(); host.Close(); deleteHost(t, name) })
		return ta
	}
	a := newAgent(ns+"-a", simDomain("web", ns, "32Mi", 4, sharedDisk(t, disks, "web"), 10))
	b := newAgent(ns + "-b")
	waitDomainOn(t, ns, "web", a.name, 10*time.Second)
	waitHost(t, b)

	create(t, migration(ns, "durable", "web", b.name, strategy(v1.StrategyPostCopy), bandwidth("2Mi")))
	m := getMig(t, ns, "durable")
	_, _, doneFile := postcopy.MirrorPaths(shared, string(m.UID))
	waitFor(t, "post-copy under way with its mirror complete", 60*time.Second, func() (bool, string) {
		m := getMig(t, ns, "durable")
		s := m.Status.Source
		_, err := os.Stat(doneFile)
		return s != nil && s.Committed && s.Phase == string(engine.PhasePostCopy) && err == nil, describe(m)
	})
	a.stop() // the source agent dies in the middle of the push
	if d, ok := a.host.Domain("web"); !ok || !d.Paused() {
		t.Fatal("the dead source agent's domain is not paused on the source")
	}
	a.start(t)
	m = waitPhase(t, ns, "durable", 60*time.Second, v1.MigrationSucceeded)
	if m.Status.Target == nil || !m.Status.Target.Completed {
		t.Fatalf("target half: %s", describe(m))
	}
	noDomain(t, a, "web")
	domainRunning(t, b, "web")
	if _, err := os.Stat(doneFile); !os.IsNotExist(err) {
		t.Errorf("the mirror outlived the migration: %v", err)
	}
}

// A target agent that restarts after a domain resumed on its host settles
// its half from facts: a stop-and-copy domain (memory verified before go)
// that runs here is the migration's result, completed; a post-copy domain
// lost its page server with the old process, so it is destroyed and the
// half says discarded, for the source to resume its copy.
func TestRestartedTargetAgentSettlesResumedHalf(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	name := ns + "-b"
	// The previous agent process ran "full" (arrived by a verified
	// stop-and-copy) and received "lazy" by post-copy: resumed with every
	// page missing. Then it went; its guests stayed, and the new process
	// adopts them from the host's registry in the agent's state dir.
	stateDir := t.TempDir()
	hostCfg := sim.Config{Name: name, Memory: "1Gi", CPUs: 2, StateDir: t.TempDir(),
		Domains: []sim.DomainSpec{simDomain("full", ns, "16Mi", 4, sharedDisk(t, disks, "full"), 11)}}
	simLog := testlog.New(t).WithName("sim-b")
	host, err := sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyAll(t, host) }) // the host open at the end
	src, err := sim.NewHost(sim.Config{Name: ns + "-src", Memory: "1Gi", CPUs: 2, StateDir: t.TempDir(),
		Domains: []sim.DomainSpec{simDomain("lazy", ns, "16Mi", 4, sharedDisk(t, disks, "lazy"), 12)}}, simLog)
	if err != nil {
		t.Fatal(err)
	}
	srcDom, _ := src.Domain("lazy")
	tgt, err := host.CreateTarget(context.Background(), srcDom.Info())
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tgt.StartLazy(xenmem.NewBitmap(tgt.NumPages())); err != nil {
		t.Fatal(err)
	}
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	lazyDom, _ := host.Domain("lazy")
	lazyPID := lazyDom.PID()
	if err := host.Close(); err != nil {
		t.Fatal(err)
	}
	if host, err = sim.OpenHost(hostCfg, sim.Options{StateDir: stateDir}, simLog); err != nil {
		t.Fatal(err)
	}
	if d, ok := host.Domain("lazy"); !ok || d.PID() != lazyPID || d.Info().State != xenmem.StatePaused {
		t.Fatalf("the post-copy domain was not adopted paused with its guest %d", lazyPID)
	}
	ghost := ns + "-ghost"
	start := metav1.Now()
	for _, c := range []struct{ mig, dom, phase string }{{"full-in", "full", "StopAndCopy"}, {"lazy-in", "lazy", "PostCopy"}} {
		m := migration(ns, c.mig, c.dom, name)
		create(t, m)
		setHalves(t, m, v1.VMMigrationPhase(c.phase),
			&v1.SourceState{Host: ghost, AgentID: "ghost-agent", Phase: c.phase, StartTime: &start, Committed: true},
			&v1.TargetState{Host: name, AgentID: "previous-process", Prepared: true, Resumed: true, ResumeTime: &start})
	}
	ta := &testAgent{name: name, host: host, stateDir: stateDir}
	ta.start(t)
	t.Cleanup(func() { ta.stop(); destroyAll(t, host); host.Close(); deleteHost(t, name) })

	waitFor(t, "full-in completed by the new agent", 20*time.Second, func() (bool, string) {
		m := getMig(t, ns, "full-in")
		h := m.Status.Target
		return h != nil && h.AgentID == ta.agent.ID() && h.Completed && h.Resumed && !h.Discarded, describe(m)
	})
	domainRunning(t, ta, "full")
	waitFor(t, "lazy-in discarded by the new agent", 20*time.Second, func() (bool, string) {
		m := getMig(t, ns, "lazy-in")
		h := m.Status.Target
		return h != nil && h.AgentID == ta.agent.ID() && h.Discarded && h.Failed, describe(m)
	})
	noDomain(t, ta, "lazy")
	if err := syscall.Kill(lazyPID, 0); err == nil {
		// Reaped by init or a zombie of the test: either way not running.
		if raw, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", lazyPID)); strings.Contains(string(raw), ") S") || strings.Contains(string(raw), ") R") {
			t.Fatalf("the discarded domain's guest %d still runs", lazyPID)
		}
	}
}

// waitHost waits until an agent's XenHost shows that agent process, so a
// migration created next can be scheduled to it.
func waitHost(t *testing.T, ta *testAgent) {
	t.Helper()
	waitFor(t, "XenHost "+ta.name+" registered by its agent", 10*time.Second, func() (bool, string) {
		h := &v1.XenHost{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Name: ta.name}, h); err != nil {
			return false, err.Error()
		}
		return h.Status.AgentID == ta.agent.ID(), h.Status.AgentID
	})
}
