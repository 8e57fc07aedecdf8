package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// hostileFaults are the peers that must be refused by the target agent,
// with the agent alive and serving afterwards.
var hostileFaults = []string{"plaintext-peer", "wrong-token", "replayed-token", "reference-outside-disk", "control-out-of-order", "oversized-record"}

// hostileResult is one hostile cell.
type hostileResult struct {
	Fault      string  `json:"fault"`
	Refused    bool    `json:"refused"`
	AgentAlive bool    `json:"agentAlive"`
	OK         bool    `json:"ok"`
	Reason     string  `json:"reason"`
	RSSBefore  int64   `json:"rssBeforeMiB"`
	RSSAfter   int64   `json:"rssAfterMiB"`
	Seconds    float64 `json:"seconds"`
}

// The engine's handshake vocabulary (pkg/engine/common.go), as a peer
// speaks it on the wire.
const (
	hsMain, hsData, hsPrio, hsRecover = "main", "data", "prio", "recover"
	hostileMemMiB                     = 32
	hostileIO                         = 10 * time.Second // bound on every read and write of a hostile connection
)

// hconn is a hostile client's connection, speaking pkg/wire directly.
type hconn struct {
	c net.Conn
	r *wire.Reader
	w *wire.Writer
}

// hopen connects, sends the stream header and hello and reads the answer:
// welcomed is true when the agent answered with its own hello.
func hopen(ctx context.Context, dial func(context.Context, string) (net.Conn, error), addr string, hello wire.Control) (h *hconn, welcomed bool, answer string, err error) {
	c, err := dial(ctx, addr)
	if err != nil {
		return nil, false, "", fmt.Errorf("dial %s: %w", addr, err)
	}
	h = &hconn{c: c, r: wire.NewReader(c), w: wire.NewWriter(c)}
	_ = c.SetDeadline(time.Now().Add(hostileIO))
	if err := h.w.WriteStreamHeader(); err != nil {
		return h, false, "write failed: " + err.Error(), nil
	}
	if err := h.control(hello); err != nil {
		return h, false, "write failed: " + err.Error(), nil
	}
	if err := h.r.ReadStreamHeader(); err != nil {
		return h, false, "closed: " + err.Error(), nil
	}
	m, err := h.readControl()
	if err != nil {
		return h, false, "closed: " + err.Error(), nil
	}
	if m.Kind == "hello" {
		return h, true, "welcomed", nil
	}
	return h, false, m.Kind + ": " + m.Message, nil
}

// plaintextHello writes a stream header and hello in the clear and reads
// what comes back. refused: the agent answered with a TLS alert record or
// closed the connection without a byte of the migration protocol.
func plaintextHello(ctx context.Context, dial func(context.Context, string) (net.Conn, error), addr string, hello wire.Control) (refused bool, how string, err error) {
	c, err := dial(ctx, addr)
	if err != nil {
		return true, "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(hostileIO))
	w := wire.NewWriter(c)
	b, err := wire.MarshalControl(nil, &hello)
	if err != nil {
		return true, "", err
	}
	if err := w.WriteStreamHeader(); err == nil {
		if err = w.Write(wire.TypeControl, b); err == nil {
			_ = w.Flush()
		}
	}
	buf := make([]byte, 512)
	n, rerr := io.ReadAtLeast(c, buf, 1)
	switch {
	case n > 0 && buf[0] == 0x15:
		return true, fmt.Sprintf("refused at the TLS handshake: a TLS alert record (%d bytes), then %v", n, rerr), nil
	case n == 0 && os.IsTimeout(rerr):
		return false, fmt.Sprintf("no answer within %s: the connection stays open", hostileIO), nil
	case n == 0:
		return true, fmt.Sprintf("refused at the TLS handshake: closed without a reply (%v)", rerr), nil
	}
	return false, fmt.Sprintf("answered %d bytes that are not a TLS alert: %q", n, buf[:min(n, 32)]), nil
}

func (h *hconn) close() {
	if h != nil {
		h.c.Close()
	}
}

func (h *hconn) send(t wire.Type, body []byte) error {
	_ = h.c.SetWriteDeadline(time.Now().Add(hostileIO))
	if err := h.w.Write(t, body); err != nil {
		return err
	}
	return h.w.Flush()
}

func (h *hconn) control(m wire.Control) error {
	b, err := wire.MarshalControl(nil, &m)
	if err != nil {
		return err
	}
	return h.send(wire.TypeControl, b)
}

func (h *hconn) readControl() (wire.Control, error) {
	rec, err := h.r.Next()
	if err != nil {
		return wire.Control{}, err
	}
	if rec.Type != wire.TypeControl {
		return wire.Control{}, fmt.Errorf("a %v record, not a control", rec.Type)
	}
	return wire.ParseControl(rec.Body)
}

// session is an authorised hostile session: main, one data stream and
// the priority stream, as a source opens them.
type hsession struct{ main, data, prio *hconn }

func (s *hsession) close() {
	if s != nil {
		s.main.close()
		s.data.close()
		s.prio.close()
	}
}

func (l *lab) openSession(ctx context.Context, addr, id string, tok []byte) (*hsession, error) {
	s := &hsession{}
	for _, role := range []string{hsMain, hsData, hsPrio} {
		h, ok, ans, err := hopen(ctx, l.creds.dial, addr, wire.Control{Kind: "hello", MigrationID: id, Token: tok, Streams: 1, Message: role})
		if err != nil || !ok {
			h.close()
			s.close()
			return nil, fmt.Errorf("%s stream not welcomed with a valid token: %v %s", role, err, ans)
		}
		switch role {
		case hsMain:
			s.main = h
		case hsData:
			s.data = h
		default:
			s.prio = h
		}
	}
	return s, nil
}

// header sends a HEADER for domain dom with disk path disk.
func (s *hsession) header(dom string, numPages uint64, disk string) error {
	info := xenmem.DomainInfo{Name: dom, Namespace: "default", MemoryBytes: numPages * labkit.PageSize, VCPUs: 1,
		Disks: []xenmem.Disk{{ID: "xvda", Path: disk}}}
	cfg, err := json.Marshal(info)
	if err != nil {
		return err
	}
	h := wire.Header{Version: wire.Version, PageShift: 12, NumPages: numPages, Flags: wire.FlagDedup, Config: cfg}
	return s.main.send(wire.TypeHeader, h.Marshal(nil))
}

// outcome waits for what the main connection says next: an error or a
// close means the agent refused.
func (h *hconn) outcome(limit time.Duration) (refused bool, what string) {
	_ = h.c.SetReadDeadline(time.Now().Add(limit))
	for {
		m, err := h.readControl()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return false, "no answer"
			}
			return true, "connection closed (" + labkit.Clip(err.Error(), 80) + ")"
		}
		switch m.Kind {
		case "error":
			return true, "error: " + labkit.Clip(m.Message, 160)
		case "prepared", "drained", "ready", "resumed", "done":
			return false, m.Kind
		}
	}
}

// runHostileCell: fresh agents, a migration held before its source
// connects (so this program can speak for it with its real token), the
// attack, then a normal migration through the same target agent.
func (l *lab) runHostileCell(ctx context.Context, idx int, fault string) (res hostileResult) {
	t0 := time.Now()
	res = hostileResult{Fault: fault}
	defer func() { res.Seconds = labkit.Round1(time.Since(t0).Seconds()) }()
	var notes []string
	note := func(f string, a ...any) { notes = append(notes, fmt.Sprintf(f, a...)) }
	defer func() { res.Reason = strings.Join(notes, "; ") }()

	// Victims are migrations held before their source connects, so that
	// this program can speak for them with their real token; each
	// authorised probe spends one (a failed session fails its migration).
	nVictims := 1
	switch fault {
	case "replayed-token":
		nVictims = 0
	case "reference-outside-disk", "oversized-record":
		nVictims = 2
	}
	var victims []string
	for i := range nVictims {
		victims = append(victims, fmt.Sprintf("vh-%02d-%d", idx, i))
	}
	normal, first := fmt.Sprintf("vn-%02d", idx), fmt.Sprintf("vr-%02d", idx)
	cellDir := filepath.Join(l.work, "cells", normal)
	if err := os.MkdirAll(cellDir, 0o755); err != nil {
		note("harness: %v", err)
		return
	}
	defer func() {
		for _, d := range append([]string{normal, first}, victims...) {
			os.Remove(filepath.Join(l.work, "disks", d+".img"))
		}
	}()
	l.resetHosts()
	doms := []domSpec{{name: normal, memMiB: hostileMemMiB, seed: 400 + idx, dirty: 1}}
	for i, v := range victims {
		doms = append(doms, domSpec{name: v, memMiB: hostileMemMiB, seed: 300 + 10*idx + i, dirty: 1})
	}
	if fault == "replayed-token" {
		doms = append(doms, domSpec{name: first, memMiB: hostileMemMiB, seed: 500 + idx, dirty: 1})
	}
	cfgA, cfgB := filepath.Join(cellDir, "a.yaml"), filepath.Join(cellDir, "b.yaml")
	if err := l.writeSimConfig(cfgA, hostA, doms); err != nil {
		note("harness: %v", err)
		return
	}
	if err := l.writeSimConfig(cfgB, hostB, nil); err != nil {
		note("harness: %v", err)
		return
	}
	a, b := l.agents[hostA], l.agents[hostB]
	for _, s := range []struct{ host, cfg string }{{hostA, cfgA}, {hostB, cfgB}} {
		if err := l.startAgent(ctx, s.host, s.cfg, ""); err != nil {
			note("harness: start %s: %v", s.host, err)
			return
		}
	}
	for _, d := range doms {
		if err := l.waitDomain(ctx, d.name, hostA); err != nil {
			note("harness: XenDomain %s not published: %v", d.name, err)
			return
		}
	}
	addr := b.dataAddr
	bPID := b.p.PID()

	var held []victim
	if fault == "replayed-token" {
		m, t, err := l.migrateNormally(ctx, first)
		if err != nil {
			note("harness: the first migration, whose token is replayed, did not succeed: %v", err)
			return
		}
		held = append(held, victim{dom: first, id: string(m.UID), tok: t})
	} else {
		var err error
		if held, err = l.holdVictims(ctx, a, victims); err != nil {
			note("harness: %v", err)
			return
		}
	}

	res.RSSBefore = agentRSS(bPID)
	res.Refused, notes = l.attack(ctx, fault, addr, held, notes)
	labkit.SleepCtx(ctx, time.Second)
	res.RSSAfter = agentRSS(bPID)
	alive := b.p.Alive() && b.p.PID() == bPID
	if !alive {
		note("the target agent died: %s", crashLine(b.p.Tail(16<<20)))
	} else if res.RSSAfter-res.RSSBefore > 256 {
		note("the target agent grew by %d MiB", res.RSSAfter-res.RSSBefore)
	}
	serves := false
	if alive {
		if _, _, err := l.migrateNormally(ctx, normal); err != nil {
			note("a normal migration after the attack failed: %v", err)
		} else {
			serves = b.p.Alive() && b.p.PID() == bPID
		}
	}
	res.AgentAlive = alive && serves
	res.OK = res.Refused && res.AgentAlive
	return
}

// victim is a migration this program speaks for.
type victim struct {
	dom, id string
	tok     []byte
}

// holdVictims starts a migration of each domain with the source agent held
// at its "start" failpoint, and waits until each one's target is ready.
func (l *lab) holdVictims(ctx context.Context, a *agent, doms []string) ([]victim, error) {
	if err := a.setFailpoints("start=sleep:100s"); err != nil {
		return nil, err
	}
	defer a.setFailpoints("")
	for _, d := range doms {
		mig := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: d},
			Spec: v1.VMMigrationSpec{Domain: d, TargetHost: hostB, Strategy: v1.StrategyPreCopy}}
		if err := l.c.Create(ctx, mig); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	var out []victim
	for _, d := range doms {
		var m *v1.VMMigration
		err := waitFor(ctx, 60*time.Second, 100*time.Millisecond, func() (bool, error) {
			var err error
			if m, err = l.getMig(ctx, d); err != nil {
				return false, err
			}
			return m.Status.Source != nil && m.Status.Source.StartTime != nil && m.Status.Target != nil && m.Status.Target.Ready, nil
		})
		if err != nil {
			return nil, fmt.Errorf("victim %s was not held with a ready target: %w (phase %s)", d, err, labkit.PhaseOf(m))
		}
		tok, err := l.creds.migrationToken(ctx, m)
		if err != nil {
			return nil, err
		}
		out = append(out, victim{dom: d, id: string(m.UID), tok: tok})
	}
	// Every source sits in the hold before the failpoint is cleared.
	if err := waitFor(ctx, 30*time.Second, 100*time.Millisecond, func() (bool, error) { return a.hits("start") >= len(doms), nil }); err != nil {
		return nil, fmt.Errorf("%d of %d sources reached the start failpoint: %w", a.hits("start"), len(doms), err)
	}
	return out, nil
}

// migrateNormally runs a plain migration of dom from A to B and returns it
// with the token it used (read while it ran).
func (l *lab) migrateNormally(ctx context.Context, dom string) (*v1.VMMigration, []byte, error) {
	mig := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: dom},
		Spec: v1.VMMigrationSpec{Domain: dom, TargetHost: hostB, Strategy: v1.StrategyPreCopy}}
	if err := l.c.Create(ctx, mig); err != nil {
		return nil, nil, err
	}
	var tok []byte
	var m *v1.VMMigration
	err := waitFor(ctx, 90*time.Second, 100*time.Millisecond, func() (bool, error) {
		var err error
		if m, err = l.getMig(ctx, dom); err != nil {
			return false, err
		}
		if tok == nil && m.Status.Tokens != nil {
			tok, _ = l.creds.migrationToken(ctx, m)
		}
		return m.Status.Phase.IsFinal(), nil
	})
	if err != nil {
		return m, tok, fmt.Errorf("%s: %w (phase %s)", dom, err, labkit.PhaseOf(m))
	}
	if m.Status.Phase != v1.MigrationSucceeded {
		return m, tok, fmt.Errorf("%s ended %s: %s", dom, m.Status.Phase, labkit.Clip(m.Status.FailureReason, 200))
	}
	if tok == nil {
		return m, tok, fmt.Errorf("%s: its token was never readable", dom)
	}
	return m, tok, nil
}

// attack runs one hostile peer and says whether the agent refused it.
func (l *lab) attack(ctx context.Context, fault, addr string, held []victim, notes []string) (bool, []string) {
	note := func(f string, a ...any) { notes = append(notes, fmt.Sprintf(f, a...)) }
	numPages := uint64(hostileMemMiB << 20 / labkit.PageSize)
	hello := func(v victim, role string, tok []byte) wire.Control {
		return wire.Control{Kind: "hello", MigrationID: v.id, Token: tok, Streams: 1, Message: role}
	}
	// session opens an authorised session for v and sends a header whose
	// disk is disk; ok means the agent prepared the domain.
	session := func(v victim, pages uint64, disk string) (*hsession, bool) {
		s, err := l.openSession(ctx, addr, v.id, v.tok)
		if err != nil {
			note("harness: %v", err)
			return nil, false
		}
		if err := s.header(v.dom, pages, disk); err != nil {
			note("header refused on write: %v", err)
			return s, false
		}
		return s, true
	}
	switch fault {
	case "plaintext-peer":
		// A peer without TLS sends the migration's real token in the clear.
		// The agent's listener is TLS-only: it must end the connection in
		// the handshake, before any byte of the migration protocol.
		v := held[0]
		refused, how, err := plaintextHello(ctx, l.creds.dialPlain, addr, hello(v, hsMain, v.tok))
		if err != nil {
			note("plaintext connection failed: %v", err)
			return true, notes
		}
		note("plaintext hello with the migration's real token: %s", how)
		return refused, notes

	case "wrong-token":
		v := held[0]
		bad := make([]byte, len(v.tok))
		_, _ = rand.Read(bad)
		h, ok, ans, err := hopen(ctx, l.creds.dial, addr, hello(v, hsMain, bad))
		h.close()
		if err != nil {
			note("connection failed: %v", err)
			return true, notes
		}
		note("hello with a wrong token: %s", ans)
		return !ok, notes

	case "replayed-token":
		v := held[0]
		refused := true
		for _, role := range []string{hsMain, hsRecover} {
			h, ok, ans, err := hopen(ctx, l.creds.dial, addr, hello(v, role, v.tok))
			h.close()
			if err != nil {
				ans = err.Error()
			}
			note("%s hello replaying the token of a finished migration: %s", role, ans)
			refused = refused && !ok
		}
		return refused, notes

	case "reference-outside-disk":
		// (a) A header naming a file of the target host outside the domain's
		// disks (a decoy with known content) and a reference to its first
		// block with the right hash: the target must not read it.
		decoy := filepath.Join(l.work, "decoy.img")
		block := make([]byte, 1<<20)
		_, _ = rand.Read(block)
		if err := os.WriteFile(decoy, block, 0o644); err != nil {
			note("harness: %v", err)
			return false, notes
		}
		refusedA := false
		if s, ok := session(held[0], numPages, decoy); ok {
			if ref, what := s.main.outcome(hostileIO); ref || what != "prepared" {
				note("(a) header naming a decoy file as the domain's disk: %s", what)
				refusedA = ref
			} else {
				ref := []wire.DiskRef{{PFN: 0, Disk: 0, Offset: 0, Hash: dedup.HashPage(block[:labkit.PageSize])}}
				_ = s.data.send(wire.TypeDiskRefs, wire.MarshalDiskRefs(nil, ref))
				_ = s.data.control(wire.Control{Kind: "flush", Stream: 0, Message: "drain"})
				_ = s.main.control(wire.Control{Kind: "drain"})
				got := make(chan []uint64, 1)
				go func() { got <- s.prio.requests(4 * time.Second) }()
				r, what := s.main.outcome(4 * time.Second)
				req := <-got
				switch {
				case r:
					refusedA = true
				case contains(req, 0):
					refusedA = true
					what += ", the page was asked for instead"
				case what == "drained":
					what += ": the target read the decoy file and installed its block as guest memory"
				}
				note("(a) a reference into a decoy file outside the domain's disks: %s", what)
			}
			s.close()
		} else {
			refusedA = true
			s.close()
		}
		// (b) A reference far past the end of the domain's real disk.
		refusedB := false
		if s, ok := session(held[1], numPages, filepath.Join(l.work, "disks", held[1].dom+".img")); ok {
			if ref, what := s.main.outcome(hostileIO); ref || what != "prepared" {
				note("(b) genuine header: %s", what)
				refusedB = ref
			} else {
				ref := []wire.DiskRef{{PFN: 1, Disk: 0, Offset: 1 << 40}}
				_ = s.data.send(wire.TypeDiskRefs, wire.MarshalDiskRefs(nil, ref))
				_ = s.data.control(wire.Control{Kind: "flush", Stream: 0, Message: "drain"})
				_ = s.main.control(wire.Control{Kind: "drain"})
				r, what := s.main.outcome(4 * time.Second)
				refusedB = r
				note("(b) a reference at offset 2^40 of the domain's disk: %s", what)
			}
			s.close()
		} else {
			refusedB = true
			s.close()
		}
		return refusedA && refusedB, notes

	case "control-out-of-order":
		s, ok := session(held[0], numPages, filepath.Join(l.work, "disks", held[0].dom+".img"))
		defer s.close()
		if !ok {
			return true, notes
		}
		if ref, what := s.main.outcome(hostileIO); ref || what != "prepared" {
			note("genuine header: %s", what)
			return ref, notes
		}
		// "pushed" belongs to post-copy; here the domain was only prepared.
		_ = s.main.control(wire.Control{Kind: "pushed"})
		_ = s.data.control(wire.Control{Kind: "flush", Stream: 0, Message: "pushed"})
		go s.prio.requests(5 * time.Second) // keep the priority stream drained
		ref, what := s.main.outcome(5 * time.Second)
		note("\"pushed\" (and its flush marker) right after prepared, outside post-copy: %s", what)
		return ref, notes

	case "oversized-record":
		refused := true
		// (a) Before any authentication: a first record claiming a 4 GiB body.
		if c, err := l.creds.dial(ctx, addr); err == nil {
			h := &hconn{c: c, r: wire.NewReader(c), w: wire.NewWriter(c)}
			_ = c.SetDeadline(time.Now().Add(hostileIO))
			_ = h.w.WriteStreamHeader()
			_ = h.w.Flush()
			hdr := make([]byte, 16)
			binary.LittleEndian.PutUint32(hdr[0:], uint32(wire.TypeControl))
			binary.LittleEndian.PutUint32(hdr[4:], 0xffffff00)
			_, _ = c.Write(hdr)
			r, what := false, "no answer"
			if err := h.r.ReadStreamHeader(); err != nil {
				r, what = true, "closed: "+labkit.Clip(err.Error(), 80)
			} else {
				r, what = h.outcome(5 * time.Second)
			}
			note("(a) unauthenticated first record claiming a 4 GiB body: %s", what)
			refused = refused && r
			h.close()
		} else {
			note("(a) %v", err)
		}
		// (b) A header claiming 2^51 pages.
		if s, ok := session(held[0], 1<<51, filepath.Join(l.work, "disks", held[0].dom+".img")); ok {
			r, what := s.main.outcome(5 * time.Second)
			note("(b) header claiming 2^51 pages: %s", what)
			refused = refused && r
			s.close()
		} else {
			s.close()
		}
		labkit.SleepCtx(ctx, 500*time.Millisecond)
		// (c) One maximal reference record after a genuine header.
		if s, ok := session(held[1], numPages, filepath.Join(l.work, "disks", held[1].dom+".img")); ok {
			if r, what := s.main.outcome(hostileIO); r || what != "prepared" {
				note("(c) genuine header: %s", what)
				refused = refused && r
			} else {
				n := (wire.MaxBody - 8) / 40
				refs := make([]wire.DiskRef, n)
				for i := range refs {
					refs[i] = wire.DiskRef{PFN: uint64(i) % numPages, Offset: uint64(i%1024) * labkit.PageSize}
				}
				err := s.data.send(wire.TypeDiskRefs, wire.MarshalDiskRefs(nil, refs))
				go s.prio.requests(5 * time.Second)
				r, what := s.main.outcome(5 * time.Second)
				if err != nil && !r {
					r, what = true, "write failed: "+err.Error()
				}
				note("(c) one record of %d references (%d MiB): %s", n, n*40>>20, what)
				refused = refused && r
			}
			s.close()
		} else {
			s.close()
		}
		return refused, notes
	}
	note("unknown hostile fault %q", fault)
	return false, notes
}

// requests collects the pfns of REQUEST records on a priority connection
// for a while.
func (h *hconn) requests(limit time.Duration) []uint64 {
	var out []uint64
	_ = h.c.SetReadDeadline(time.Now().Add(limit))
	for {
		rec, err := h.r.Next()
		if err != nil {
			return out
		}
		if rec.Type == wire.TypeRequest {
			if _, pfns, err := wire.ParseRequest(rec.Body, nil); err == nil {
				out = append(out, pfns...)
			}
		}
	}
}

func contains(s []uint64, v uint64) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// crashLine finds why a Go process died in the tail of its log.
func crashLine(log string) string {
	for _, l := range strings.Split(log, "\n") {
		for _, p := range []string{"panic:", "fatal error:", "runtime: out of memory"} {
			if strings.HasPrefix(l, p) {
				return labkit.Clip(l, 200)
			}
		}
	}
	return labkit.Clip(lastLines(log, 2), 200)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
