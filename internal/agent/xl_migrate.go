package agent

// The agent's second data path: on a host whose backend carries
// migrations through the stock toolstack (capabilities.transport "xl"),
// the source runs `xl migrate -s "node-agent xl-send ..."` and the target
// serves the data port with xl migrate-receive behind the same checks as
// the engine's receiver: mTLS peer = the migration's source host, the
// migration's single-use token, and a domain configuration that names the
// domain and the disks the API says it has. Everything else about a
// VMMigration (status halves, the point of no return, the verdict after a
// failure past it) is shared with the engine path.

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/internal/xlpath"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

// xlMaxIncoming bounds the incoming xl migrations served at once: each may
// run a root xl migrate-receive.
const xlMaxIncoming = 4

// usesXL reports whether this host's data path is the stock toolstack.
func (a *Agent) usesXL() bool { return a.transport == xenmem.TransportXL }

// serveXL serves the data port for incoming xl migrations.
func (tr *TargetReconciler) serveXL(ctx context.Context) error {
	srv := &xlRecvServer{src: tr.tls, maxConns: xlMaxIncoming, handshakeTimeout: 10 * time.Second,
		log: tr.log.WithName("xl-receiver"), handle: tr.receiveXLMigration}
	return srv.serve(ctx, tr.ln, false)
}

// receiveXLMigration serves one incoming xl migration and reports its
// half from facts: whether the domain runs on this host when xl
// migrate-receive has ended.
func (tr *TargetReconciler) receiveXLMigration(ctx context.Context, c net.Conn, log logr.Logger) error {
	peer := ""
	if tc, ok := c.(*tls.Conn); ok {
		peer = pki.PeerHost(tc.ConnectionState())
	}
	au, err := xlpath.ReadAuth(c)
	if err != nil {
		return err
	}
	g, err := tr.authorize(ctx, engine.AuthRequest{MigrationID: au.Migration, Role: "main", Token: au.Token, PeerHost: peer})
	if err != nil {
		return fmt.Errorf("refused an xl migration: %w", err)
	}
	name := g.Domain.Name
	log = log.WithValues("migration", au.Migration, "domain", name)
	if doms, err := tr.host.Domains(ctx); err == nil {
		for _, d := range doms {
			if d.Name == name {
				tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventFailed, Domain: name,
					Err: fmt.Errorf("a domain named %s already exists on %s", name, tr.cfg.Host)})
				return fmt.Errorf("refused an xl migration of %s: a domain of that name exists here", name)
			}
		}
	}
	tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventPrepared, Domain: name})
	var lazy *lazyStats
	status, rerr := receiveXL(ctx, c, tr.cfg.XL, log, func(h *xlstream.XLHeader) error { return checkXLConfig(h, g.Domain) },
		xlRecvLazy{spoolDir: tr.spoolDir(), report: func(st lazyStats) { lazy = &st },
			// Early resume: the domain runs here before its last pages
			// arrive; the status says so at once (phase PostCopy).
			resumed: func() { tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventResumed, Domain: name}) }})
	// xl migrate-receive has ended: nothing more will create or start the
	// domain here, so what runs now is the verdict.
	runs, incoming, err := tr.xlDomainHere(ctx, name)
	switch {
	case err != nil:
		tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventFailed, Domain: name,
			Err: fmt.Errorf("xl migrate-receive ended (status %d, %v) and listing the domains failed: %w; check with xl list before resuming it anywhere", status, rerr, err)})
	case runs:
		// xl starts the domain only after the whole stream arrived and
		// each rebuilt record matched the source's checksum.
		tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventResumed, Domain: name})
		tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventDone, Domain: name, Stats: lazy.receiveStats()})
		if rerr != nil {
			log.Info("The domain runs here although the session ended badly", "reason", rerr.Error())
			rerr = nil
		}
	default:
		if incoming {
			// xl left its paused copy behind; it never runs now.
			if err := tr.xlCommand(ctx, "destroy", name+"--incoming"); err != nil {
				log.Error(err, "Could not destroy the incoming copy xl left behind")
			}
		}
		why := rerr
		if why == nil {
			why = fmt.Errorf("xl migrate-receive exited with status %d and the domain does not run here", status)
		}
		tr.onReceiverEvent(au.Migration, engine.Event{Kind: engine.EventDiscarded, Domain: name, Err: fmt.Errorf("the domain does not run on %s: %w", tr.cfg.Host, why)})
	}
	return rerr
}

// checkXLConfig vets the domain configuration in xl's header against the
// grant (built from the API, never from the sender): the same domain name
// and only the disks the XenDomain lists, so that a sender cannot make
// this host attach anything else.
func checkXLConfig(h *xlstream.XLHeader, want xenmem.DomainInfo) error {
	var c struct {
		CInfo struct {
			Name string `json:"name"`
		} `json:"c_info"`
	}
	if err := json.Unmarshal(h.Config, &c); err != nil {
		return fmt.Errorf("domain configuration: %w", err)
	}
	if c.CInfo.Name != want.Name {
		return fmt.Errorf("the stream carries domain %q, the migration is of %q", c.CInfo.Name, want.Name)
	}
	disks, err := h.Disks()
	if err != nil {
		return err
	}
	allowed := map[string]bool{}
	for _, d := range want.Disks {
		allowed[d.Path] = true
	}
	for _, d := range disks {
		if !allowed[d.PdevPath] {
			return fmt.Errorf("the stream's configuration attaches %q, which XenDomain %s does not list", d.PdevPath, want.Name)
		}
	}
	return nil
}

// xlStates returns the states in which this host holds domain name, under
// its own name or one of xl's migration names (the Xen backend maps
// NAME--incoming to StateIncoming and NAME--migratedaway to
// StateMigrating). Running and Paused both count as running.
func (a *Agent) xlStates(ctx context.Context, name string) (map[xenmem.State]bool, error) {
	doms, err := a.host.Domains(ctx)
	if err != nil {
		return nil, err
	}
	st := map[xenmem.State]bool{}
	for _, d := range doms {
		if d.Name != name {
			continue
		}
		if d.State == xenmem.StatePaused {
			d.State = xenmem.StateRunning
		}
		st[d.State] = true
	}
	return st, nil
}

// xlDomainHere reports whether name runs on this host, and whether xl's
// incoming copy of it (NAME--incoming) exists.
func (a *Agent) xlDomainHere(ctx context.Context, name string) (runs, incoming bool, err error) {
	st, err := a.xlStates(ctx, name)
	return st[xenmem.StateRunning], st[xenmem.StateIncoming], err
}

// xlMigratingHere reports whether xl left name suspended here as
// NAME--migratedaway, and whether it runs here under its own name.
func (a *Agent) xlMigratingHere(ctx context.Context, name string) (away, runs bool, err error) {
	st, err := a.xlStates(ctx, name)
	return st[xenmem.StateMigrating], st[xenmem.StateRunning], err
}

func (a *Agent) xlCommand(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, a.cfg.XL, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", a.cfg.XL, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// xlHeld is a domain xl left suspended here as NAME--migratedaway after a
// failure past the permission to go: only the target's verdict resolves
// it (see resolveCommitted). gone: nothing of it is left here.
type xlHeld struct {
	a    *Agent
	name string
	gone bool
}

func (h *xlHeld) Info() xenmem.DomainInfo { return xenmem.DomainInfo{Name: h.name} }

// Reclaim gives the domain its name back and unpauses it, as xl's own
// message says to, once the target said it does not run it.
func (h *xlHeld) Reclaim(reason string) error {
	if h.gone {
		return fmt.Errorf("domain %s is not on this host any more: nothing to resume", h.name)
	}
	ctx := context.Background()
	if err := h.a.xlCommand(ctx, "rename", h.name+xlpath.MigratedAwaySuffix, h.name); err != nil {
		return err
	}
	h.a.log.Info("Resuming the domain xl left suspended", "domain", h.name, "reason", reason)
	return h.a.xlCommand(ctx, "unpause", h.name)
}

// Release destroys the suspended copy, once the target runs the domain.
func (h *xlHeld) Release() error {
	if h.gone {
		return nil
	}
	return h.a.xlCommand(context.Background(), "destroy", h.name+xlpath.MigratedAwaySuffix)
}

func (h *xlHeld) Close() error { return nil }

// shellQuote quotes a word for sh -c (xl runs its -s command that way).
func shellQuote(s string) string {
	if s != "" && !strings.ContainsFunc(s, func(r rune) bool {
		return !(r == '/' || r == '-' || r == '_' || r == '.' || r == ':' || r == '=' ||
			r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	}) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// xlFiles writes what the transport needs into dir: the agent's TLS
// material and the migration's auth frame, readable by root only.
func (a *Agent) xlFiles(dir, uid string, tok []byte) (cert, key, ca, auth string, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", "", "", fmt.Errorf("xl work dir: %w", err)
	}
	certPEM, keyPEM, caPEM, err := a.tls.PEM()
	if err != nil {
		return "", "", "", "", fmt.Errorf("the agent has no certificate yet: %w", err)
	}
	ab, err := json.Marshal(xlpath.Auth{Migration: uid, Token: tok})
	if err != nil {
		return "", "", "", "", err
	}
	cert, key, ca, auth = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt"), filepath.Join(dir, "auth.json")
	for p, b := range map[string][]byte{cert: certPEM, key: keyPEM, ca: caPEM, auth: ab} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return "", "", "", "", fmt.Errorf("xl work dir: %w", err)
		}
	}
	return cert, key, ca, auth, nil
}

// startSourceXL runs the outgoing half through xl migrate. r is announced
// already; the caller checked that nothing stops it.
func (sr *SourceReconciler) startSourceXL(ctx context.Context, m *v1.VMMigration, r *run, domain string, tok []byte) (reconcile.Result, error) {
	fail := func(err error) (reconcile.Result, error) {
		sr.log.Error(err, "Outgoing xl migration could not start", "migration", klogKey(m))
		r.mu.Lock()
		r.failed, r.finished, r.message, r.changed = true, true, err.Error(), true
		r.mu.Unlock()
		return sr.flushSource(ctx, m, r)
	}
	p := m.Status.Parameters
	host, port, err := net.SplitHostPort(m.Status.Target.Address)
	if err != nil {
		return fail(fmt.Errorf("target address %q: %w", m.Status.Target.Address, err))
	}
	dir := filepath.Join(sr.cfg.StateDir, "xl", r.uid)
	cert, key, ca, auth, err := sr.xlFiles(dir, r.uid, tok)
	if err != nil {
		return fail(err)
	}
	self := sr.cfg.NodeAgent
	if self == "" {
		if self, err = os.Executable(); err != nil {
			return fail(fmt.Errorf("find node-agent for xl's transport: %w", err))
		}
	}
	words := []string{self, "xl-send", "--port", port, "--server-name", m.Status.TargetHost,
		"--tls-cert", cert, "--tls-key", key, "--tls-ca", ca, "--state-dir", sr.cfg.StateDir}
	if !hasDedup(engine.Strategy(p.EngineStrategy)) {
		words = append(words, "--no-dedup")
	}
	if p.BandwidthBytesPerSecond > 0 {
		words = append(words, "--rate", fmt.Sprint(p.BandwidthBytesPerSecond))
	}
	if p.Compression == v1.PageCodecZstd {
		// Both agents publish the codec: page records go compressed
		// where that pays, record by record.
		words = append(words, "--compress")
		if p.CompressionMode == v1.CompressionAlways {
			words = append(words, "--compress-always")
		}
	}
	if earlyResumeStrategy(p.EngineStrategy) {
		// The controller chose a post-copy strategy only between hosts
		// that publish early resume. xl-send holds an HVM/PVH domain's
		// RAM back (a PV domain's stream goes unchanged, pre-copy).
		words = append(words, "--early-resume", "--spool-dir", sr.spoolDir())
		if p.BandwidthBytesPerSecond > 0 {
			words = append(words, "--push-rate", fmt.Sprint(p.BandwidthBytesPerSecond*9/10))
		}
	}
	for i, w := range words {
		words[i] = shellQuote(w)
	}
	progFile := filepath.Join(dir, "progress.json")
	_ = os.Remove(progFile)
	var mem uint64
	if info, err := sr.domainInfo(ctx, domain); err == nil {
		mem = info.MemoryBytes
	}
	var last time.Time
	var lastLink int64
	report := func(pp xlpath.Progress) {
		now := time.Now()
		r.mu.Lock()
		pr := engine.Progress{Phase: engine.PhasePreCopy, Committed: pp.Committed, WireBytes: pp.LinkBytes,
			Pages: engine.PageCounts{Zero: uint64(pp.ZeroPages), Disk: uint64(pp.RefPages), Full: uint64(pp.DataPages),
				DiskFallback: uint64(pp.FallbackPages), Total: uint64(pp.ZeroPages + pp.RefPages + pp.DataPages)}}
		if pp.StreamDone {
			pr.Phase = engine.PhaseStopAndCopy
		}
		if pp.PostCopy {
			pr.Phase = engine.PhasePostCopy
		}
		if mem > 0 {
			// The first round carries every page once; later rounds are
			// unknown ahead, so the figure stops short of 100 until done.
			pr.Percent = min(99, float64(pp.StreamBytes)*100/float64(mem))
		}
		pr.Percent = max(pr.Percent, r.progress.Percent)
		if !last.IsZero() && now.After(last) {
			pr.WireBytesPerSec = float64(pp.LinkBytes-lastLink) / now.Sub(last).Seconds()
		}
		last, lastLink = now, pp.LinkBytes
		newlyCommitted := pp.Committed && !r.committed
		phaseChanged := pr.Phase != r.phase || newlyCommitted
		r.progress, r.phase, r.changed = pr, pr.Phase, true
		if newlyCommitted {
			r.committed = true
			sr.saveStateLocked(r)
		}
		r.mu.Unlock()
		if phaseChanged {
			sr.wakeUp(r)
		}
	}
	mig := xlpath.Migration{XL: sr.cfg.XL, Domain: domain, Host: host, Transport: strings.Join(words, " "),
		Env:          []string{xlAuthFileEnv + "=" + auth, xlProgressFileEnv + "=" + progFile},
		ProgressFile: progFile, Progress: report, PollEvery: 500 * time.Millisecond,
		Log: sr.log.WithName("xl").WithValues("migration", klogKey(m))}
	r.mu.Lock()
	r.cancel = func() {
		if asked, err := xlpath.Abort(progFile); err != nil || !asked {
			sr.log.Info("Abort not sent to xl's transport (not started, or past the permission to go)", "migration", r.key, "err", err)
		}
	}
	r.mu.Unlock()
	sr.log.Info("Starting outgoing xl migration", "migration", klogKey(m), "domain", domain, "to", m.Status.TargetHost, "addr", m.Status.Target.Address, "strategy", p.EngineStrategy)
	sr.transfers.Add(1)
	go func() {
		defer sr.transfers.Done()
		res, err := mig.Run(context.WithoutCancel(ctx))
		report(res.Last)
		outcome := res.Outcome
		var held *xlHeld
		if outcome == xlpath.Undecided || outcome == xlpath.Unknown {
			// Facts first: what does this host hold now?
			away, runs, lerr := sr.xlMigratingHere(context.Background(), domain)
			switch {
			case lerr != nil:
				held = &xlHeld{a: sr.Agent, name: domain}
			case runs:
				outcome = xlpath.ResumedHere
			case away:
				held = &xlHeld{a: sr.Agent, name: domain}
			case outcome == xlpath.Unknown && !res.Last.Committed:
				outcome = xlpath.ResumedHere // never committed: the target cannot run it
			default:
				held = &xlHeld{a: sr.Agent, name: domain, gone: true}
			}
		}
		result := &engine.Result{Strategy: engine.Strategy(p.EngineStrategy), MemoryBytes: mem,
			Total: time.Duration(res.Seconds * float64(time.Second)), WireBytes: res.Last.LinkBytes,
			Pages: r.progressPages(), DedupSavedBytes: (res.Last.ZeroPages + res.Last.RefPages) * xenmem.PageSize,
			Verified: outcome == xlpath.Migrated, StopReason: "xl"}
		r.mu.Lock()
		r.finished, r.changed = true, true
		switch {
		case outcome == xlpath.Migrated:
			r.done, r.result, r.phase, r.committed = true, result, engine.PhaseDone, true
		case held != nil:
			r.committed, r.dom, r.result = true, held, result
			r.message = "xl failed after the permission to go; waiting for the target's verdict, the domain suspended here: " + xlErrString(err)
		default:
			r.failed = true
			r.message = "xl resumed the domain on the source: " + xlErrString(err)
		}
		sr.saveStateLocked(r)
		r.mu.Unlock()
		switch {
		case outcome == xlpath.Migrated:
			sr.log.Info("Outgoing xl migration done", "migration", r.key, "seconds", res.Seconds, "linkBytes", res.Last.LinkBytes, "streamBytes", res.Last.StreamBytes)
			sr.recordLinkRate(result.WireBytes, result.Total)
			_ = os.RemoveAll(dir)
		case held != nil:
			sr.log.Error(err, "Outgoing xl migration failed after go; holding the domain for the target's verdict", "migration", r.key, "outcome", res.Outcome)
		default:
			sr.log.Error(err, "Outgoing xl migration failed; the domain runs here", "migration", r.key, "outcome", res.Outcome)
			_ = os.RemoveAll(dir)
		}
		sr.kickPublish()
		sr.wakeUp(r)
	}()
	return reconcile.Result{RequeueAfter: sr.cfg.StatusInterval}, nil
}

func (r *run) progressPages() engine.PageCounts {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.progress.Pages
}

func (a *Agent) domainInfo(ctx context.Context, name string) (xenmem.DomainInfo, error) {
	doms, err := a.host.Domains(ctx)
	if err != nil {
		return xenmem.DomainInfo{}, err
	}
	for _, d := range doms {
		if d.Name == name {
			return d, nil
		}
	}
	return xenmem.DomainInfo{}, fmt.Errorf("domain %s: %w", name, xenmem.ErrNoDomain)
}

func xlErrString(err error) string {
	if err == nil {
		return "no error reported"
	}
	return err.Error()
}

// adoptXLTarget settles an incoming xl migration that a previous process
// of this agent was serving: its connection died with it, so xl
// migrate-receive fails unless it had the permission to go and started
// the domain. The verdict comes from what runs here; a copy still
// incoming is waited for (its xl is ending), then destroyed.
func (tr *TargetReconciler) adoptXLTarget(ctx context.Context, m *v1.VMMigration, half *v1.TargetState) (reconcile.Result, error) {
	xd := &v1.XenDomain{}
	if err := tr.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, xd); err != nil {
		return reconcile.Result{}, fmt.Errorf("read XenDomain %s/%s: %w", m.Namespace, m.Spec.Domain, err)
	}
	name := xd.Spec.DomainName
	runs, incoming, err := tr.xlDomainHere(ctx, name)
	if err != nil {
		return reconcile.Result{}, fmt.Errorf("list domains to settle migration %s: %w", klogKey(m), err)
	}
	h := v1.TargetState{Host: tr.cfg.Host, AgentID: tr.id}
	switch {
	case runs:
		now := metav1.Now()
		h.Prepared, h.Resumed, h.Completed, h.ResumeTime = true, true, true, &now
		h.Message = "the target agent restarted; xl had started the domain here"
	case incoming && (half.LastUpdateTime == nil || time.Since(half.LastUpdateTime.Time) < xlIncomingGrace):
		return reconcile.Result{RequeueAfter: 2 * time.Second}, nil
	default:
		if incoming {
			if err := tr.xlCommand(ctx, "destroy", name+"--incoming"); err != nil {
				return reconcile.Result{}, fmt.Errorf("destroy the incoming copy of %s xl left behind: %w", name, err)
			}
		}
		h.Failed, h.Discarded = true, true
		h.Message = "the target agent restarted during the transfer; the domain does not run here (the source may resume it)"
	}
	tr.log.Info("Settled an incoming xl migration of this agent's previous process", "migration", klogKey(m), "previousAgent", half.AgentID,
		"runsHere", runs, "discarded", h.Discarded)
	return reconcile.Result{}, tr.writeTarget(ctx, m, h)
}

// xlIncomingGrace is how long a copy still incoming after a restart of
// this agent may take to end on its own (its xl lost its input).
const xlIncomingGrace = 30 * time.Second
