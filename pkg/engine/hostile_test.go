package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// rawPeer is a hand-driven source: it speaks the wire format directly, so
// a test can send what a correct source never would.
type rawPeer struct {
	t *testing.T
	c net.Conn
	r *wire.Reader
	w *wire.Writer
}

// dialRaw opens a connection with the given hello and returns the peer and
// the receiver's answer to the hello.
func dialRaw(t *testing.T, addr string, hello wire.Control) (*rawPeer, wire.Control) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p := &rawPeer{t: t, c: c, r: wire.NewReader(c), w: wire.NewWriter(c)}
	if err := p.w.WriteStreamHeader(); err != nil {
		t.Fatal(err)
	}
	hello.Kind = "hello"
	p.ctl(hello)
	_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if err := p.r.ReadStreamHeader(); err != nil {
		t.Fatalf("read the receiver's stream header: %v", err)
	}
	m, err := p.control()
	if err != nil {
		t.Fatalf("read the receiver's answer to hello: %v", err)
	}
	return p, m
}

func (p *rawPeer) send(typ wire.Type, parts ...[]byte) {
	p.t.Helper()
	if err := p.w.Write(typ, parts...); err != nil {
		p.t.Fatalf("write %v: %v", typ, err)
	}
	if err := p.w.Flush(); err != nil {
		p.t.Fatalf("flush %v: %v", typ, err)
	}
}

func (p *rawPeer) ctl(m wire.Control) {
	p.t.Helper()
	b, err := wire.MarshalControl(nil, &m)
	if err != nil {
		p.t.Fatal(err)
	}
	p.send(wire.TypeControl, b)
}

// control reads the next control message (other records are skipped).
func (p *rawPeer) control() (wire.Control, error) {
	for {
		rec, err := p.r.Next()
		if err != nil {
			return wire.Control{}, err
		}
		if rec.Type == wire.TypeControl {
			return wire.ParseControl(rec.Body)
		}
	}
}

// expect reads control messages until one of kind, failing on another
// kind or an error.
func (p *rawPeer) expect(kind string) wire.Control {
	p.t.Helper()
	_ = p.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	m, err := p.control()
	if err != nil {
		p.t.Fatalf("waiting for %q: %v", kind, err)
	}
	if m.Kind != kind {
		p.t.Fatalf("got %q (%s), want %q", m.Kind, m.Message, kind)
	}
	return m
}

// expectRefusal reads until the receiver's error message and checks that
// it says want.
func (p *rawPeer) expectRefusal(want string) string {
	p.t.Helper()
	m := p.expect("error")
	if !strings.Contains(m.Message, want) {
		p.t.Fatalf("error %q does not say %q", m.Message, want)
	}
	return m.Message
}

// header builds a HEADER record for info.
func header(t *testing.T, info xenmem.DomainInfo, pages uint64, flags uint64) []byte {
	t.Helper()
	cfg, err := json.Marshal(info)
	if err != nil {
		t.Fatal(err)
	}
	h := wire.Header{Version: wire.Version, PageShift: wire.PageShift, NumPages: pages, Flags: flags, Config: cfg}
	return h.Marshal(nil)
}

// session is a raw source with its main, one data and the priority
// connection, past "prepared".
type rawSession struct {
	main, data, prio *rawPeer
}

func openRaw(t *testing.T, addr, id string, info xenmem.DomainInfo, flags uint64) *rawSession {
	t.Helper()
	main, m := dialRaw(t, addr, wire.Control{MigrationID: id, Streams: 1, Message: "main", Token: []byte("token-" + id)})
	if m.Kind != "hello" {
		t.Fatalf("main connection refused: %s", m.Message)
	}
	main.send(wire.TypeHeader, header(t, info, info.MemoryBytes/xenmem.PageSize, flags))
	data, m := dialRaw(t, addr, wire.Control{MigrationID: id, Streams: 1, Stream: 0, Message: "data", Token: []byte("token-" + id)})
	if m.Kind != "hello" {
		t.Fatalf("data connection refused: %s", m.Message)
	}
	prio, m := dialRaw(t, addr, wire.Control{MigrationID: id, Streams: 1, Message: "prio", Token: []byte("token-" + id)})
	if m.Kind != "hello" {
		t.Fatalf("priority connection refused: %s", m.Message)
	}
	main.expect("prepared")
	return &rawSession{main: main, data: data, prio: prio}
}

// smallInfo is a 16 MiB, 2-vCPU domain without disks.
func smallInfo(name string) xenmem.DomainInfo {
	return xenmem.DomainInfo{Name: name, MemoryBytes: 16 << 20, VCPUs: 2}
}

// heapInUse is the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// totalAlloc is every byte allocated so far.
func totalAlloc() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.TotalAlloc
}

// waitGone waits until the destination host has no domain named name.
func waitGone(t *testing.T, h *sim.Host, name string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		doms, err := h.Domains(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, d := range doms {
			found = found || d.Name == name
		}
		if !found {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("domain %s still on the destination host", name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// migrateOne proves the receiver still serves: a real migration succeeds.
func (e *env) migrateOne(name string) {
	e.t.Helper()
	_, dom := e.domain(name, "32Mi", sim.Profile{Seed: 5, Zero: 0.5})
	res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: engine.StrategyPreCopy, MigrationID: name}, engine.Hooks{Log: testlog.New(e.t)})
	if err != nil || !res.Verified {
		e.t.Fatalf("a migration after the hostile one: verified=%v err=%v", res.Verified, err)
	}
}

// TestHugeHeaderRefusedWithoutAllocation: a header claiming 2^51 pages
// (8 EiB) used to allocate per-page state for them and kill the agent; it
// is refused before anything is allocated, with or without a grant, and
// the receiver serves the next migration.
func TestHugeHeaderRefusedWithoutAllocation(t *testing.T) {
	e := newEnv(t, nil)
	huge := uint64(1) << 51
	info := xenmem.DomainInfo{Name: "huge", MemoryBytes: huge * xenmem.PageSize, VCPUs: 1}
	before := totalAlloc()
	main, m := dialRaw(t, e.addr, wire.Control{MigrationID: "huge", Streams: 1, Message: "main"})
	if m.Kind != "hello" {
		t.Fatalf("refused: %s", m.Message)
	}
	main.send(wire.TypeHeader, header(t, info, huge, 0))
	msg := main.expectRefusal("protocol violation")
	if grew := totalAlloc() - before; grew > 32<<20 {
		t.Fatalf("the refusal allocated %d MiB", grew>>20)
	}
	t.Logf("refused: %s", msg)
	// One page more than MaxPages is refused just the same.
	e.recv.MaxPages = 4096
	main, _ = dialRaw(t, e.addr, wire.Control{MigrationID: "huge-2", Streams: 1, Message: "main"})
	main.send(wire.TypeHeader, header(t, xenmem.DomainInfo{Name: "huge2", MemoryBytes: 4097 * xenmem.PageSize, VCPUs: 1}, 4097, 0))
	main.expectRefusal("this receiver takes 1..4096")
	e.recv.MaxPages = 0
	e.migrateOne("after-huge")
}

// TestHeaderBeyondGrantRefused: with a grant, the header's pages must be
// the granted memory, and the sender's domain name the granted one.
func TestHeaderBeyondGrantRefused(t *testing.T) {
	grant := &engine.Grant{Domain: xenmem.DomainInfo{Name: "granted", MemoryBytes: 16 << 20, VCPUs: 2}}
	e := newEnv(t, func(r *engine.Receiver) {
		r.Authorize = func(_ context.Context, req engine.AuthRequest) (*engine.Grant, error) { return grant, nil }
	})
	main, _ := dialRaw(t, e.addr, wire.Control{MigrationID: "g1", Streams: 1, Message: "main"})
	main.send(wire.TypeHeader, header(t, xenmem.DomainInfo{Name: "granted", MemoryBytes: 32 << 20, VCPUs: 2}, 8192, 0))
	main.expectRefusal("authorised for 16777216 bytes")
	main, _ = dialRaw(t, e.addr, wire.Control{MigrationID: "g2", Streams: 1, Message: "main"})
	main.send(wire.TypeHeader, header(t, xenmem.DomainInfo{Name: "other", MemoryBytes: 16 << 20, VCPUs: 2}, 4096, 0))
	main.expectRefusal(`authorised for "granted"`)
}

// TestOversizedReferenceRecordRefused: one 8 MiB DISK_REFS record (209715
// references) used to allocate a page buffer for each, 900 MB; it is
// refused when parsed, the half-received domain is destroyed, and the
// receiver serves the next migration.
func TestOversizedReferenceRecordRefused(t *testing.T) {
	e := newEnv(t, nil)
	s := openRaw(t, e.addr, "bigref", smallInfo("bigref"), wire.FlagDedup)
	n := (8 << 20) / 40
	refs := make([]wire.DiskRef, n)
	for i := range refs {
		refs[i] = wire.DiskRef{PFN: uint64(i % 4096), Offset: uint64(i) * 4096}
	}
	body := wire.MarshalDiskRefs(nil, refs)
	refs = nil
	base := heapInUse()
	before := totalAlloc()
	s.data.send(wire.TypeDiskRefs, body)
	s.main.expectRefusal("disk refs in one record")
	grew := totalAlloc() - before
	t.Logf("heap in use %d MiB before; %d MiB allocated while refusing", base>>20, grew>>20)
	if grew > 64<<20 {
		t.Fatalf("refusing an 8 MiB reference record allocated %d MiB", grew>>20)
	}
	waitGone(t, e.dst, "bigref")
	e.migrateOne("after-bigref")
}

// openFDs lists the paths the test process has open.
func openFDs(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if p, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func isOpen(t *testing.T, path string) bool {
	for _, p := range openFDs(t) {
		if p == path {
			return true
		}
	}
	return false
}

// TestGrantDecidesDisksAndDomain: with a grant, the target is created from
// it (its disk path, not the one the sender's configuration names); a
// reference to a disk the grant lacks, or past the end of a granted disk,
// is a protocol error; and the path the sender named is never opened.
func TestGrantDecidesDisksAndDomain(t *testing.T) {
	dir := t.TempDir()
	granted := filepath.Join(dir, "granted.img")
	if err := sim.GenerateDisk(granted, 1<<20, 1); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(dir, "dom0-secret.img")
	if err := os.WriteFile(secret, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	grant := &engine.Grant{Domain: xenmem.DomainInfo{Name: "g", MemoryBytes: 16 << 20, VCPUs: 2,
		Disks: []xenmem.Disk{{ID: "xvda", Path: granted}}}}
	var got []engine.AuthRequest
	e := newEnv(t, func(r *engine.Receiver) {
		r.Authorize = func(_ context.Context, req engine.AuthRequest) (*engine.Grant, error) {
			got = append(got, req)
			return grant, nil
		}
	})
	sender := xenmem.DomainInfo{Name: "g", MemoryBytes: 16 << 20, VCPUs: 2,
		Disks: []xenmem.Disk{{ID: "xvda", Path: secret}, {ID: "xvdz", Path: secret}}}
	hash := dedup.HashPage(make([]byte, xenmem.PageSize))

	for _, tc := range []struct {
		name string
		ref  wire.DiskRef
		want string
	}{
		{"disk-not-granted", wire.DiskRef{PFN: 1, Disk: 1, Hash: hash}, "not one of the domain's 1 granted disks"},
		{"beyond-the-disk", wire.DiskRef{PFN: 1, Disk: 0, Offset: 2 << 20, Hash: hash}, "past the end"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openRaw(t, e.addr, "g-"+tc.name, sender, wire.FlagDedup)
			doms, err := e.dst.Domains(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			var target *xenmem.DomainInfo
			for i := range doms {
				if doms[i].Name == "g" {
					target = &doms[i]
				}
			}
			if target == nil || len(target.Disks) != 1 || target.Disks[0].Path != granted {
				t.Fatalf("target domain %+v, want one disk at %s (from the grant)", target, granted)
			}
			if isOpen(t, secret) {
				t.Fatalf("the path from the sender's configuration %s is open", secret)
			}
			if !isOpen(t, granted) {
				t.Fatalf("the granted disk %s is not open for references", granted)
			}
			s.data.send(wire.TypeDiskRefs, wire.MarshalDiskRefs(nil, []wire.DiskRef{tc.ref}))
			s.main.expectRefusal(tc.want)
			waitGone(t, e.dst, "g")
			if isOpen(t, secret) {
				t.Fatalf("the path from the sender's configuration %s was opened", secret)
			}
		})
	}
	if len(got) == 0 || got[0].Role != "main" || string(got[0].Token) != "token-g-disk-not-granted" || got[0].PeerHost != "" {
		t.Fatalf("Authorize saw %+v", got)
	}
}

// TestControlOutOfOrderFailsOnlyThatMigration: a control message the
// state does not allow (Pushed outside post-copy used to dereference a nil
// interface and crash the agent; Go before Ready resumed an unverified
// domain) fails that migration with a protocol error, destroys what was
// created, and the receiver serves the next one.
func TestControlOutOfOrderFailsOnlyThatMigration(t *testing.T) {
	failed := make(chan error, 16)
	e := newEnv(t, nil)
	events := e.recv.Events
	e.recv.Events = func(id string, ev engine.Event) {
		if ev.Kind == engine.EventFailed {
			failed <- ev.Err
		}
		events(id, ev)
	}
	for _, kind := range []string{"pushed", "go", "ready", "prepared", "hello", "discarded"} {
		t.Run(kind, func(t *testing.T) {
			name := "ooo-" + kind
			s := openRaw(t, e.addr, name, smallInfo(name), 0)
			if kind == "pushed" {
				// What finishPostCopy waited for before it closed a
				// lazy loader that only post-copy has.
				s.data.ctl(wire.Control{Kind: "flush", Message: "pushed"})
			}
			s.main.ctl(wire.Control{Kind: kind})
			s.main.expectRefusal(fmt.Sprintf("control %q on the main connection in state receiving", kind))
			waitGone(t, e.dst, name)
		})
	}
	t.Run("pages-on-main", func(t *testing.T) {
		s := openRaw(t, e.addr, "ooo-pages", smallInfo("ooo-pages"), 0)
		s.main.send(wire.TypeZeroPages, wire.MarshalPFNs(nil, []uint64{1}))
		s.main.expectRefusal("ZeroPages record on the main connection in state receiving")
	})
	t.Run("pages-after-complete-marker", func(t *testing.T) {
		s := openRaw(t, e.addr, "ooo-late", smallInfo("ooo-late"), 0)
		s.data.ctl(wire.Control{Kind: "flush", Message: "complete"})
		s.data.send(wire.TypeZeroPages, wire.MarshalPFNs(nil, []uint64{1}))
		s.main.expectRefusal(`page 1 on a data stream after its "complete" marker, not asked for`)
	})
	for range 8 {
		select {
		case err := <-failed:
			if !errors.Is(err, engine.ErrProtocol) {
				t.Errorf("failure %v does not wrap ErrProtocol", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a migration out of order did not fail")
		}
	}
	e.migrateOne("after-ooo")
}

// TestSilentSourceTimesOut: a source that stops sending while the
// destination waits for it is dropped after IdleTimeout, before and
// after the header, and what was created for it is destroyed.
func TestSilentSourceTimesOut(t *testing.T) {
	e := newEnv(t, func(r *engine.Receiver) { r.IdleTimeout = 300 * time.Millisecond })
	t0 := time.Now()
	main, _ := dialRaw(t, e.addr, wire.Control{MigrationID: "silent-1", Streams: 1, Message: "main"})
	main.expectRefusal("the source sent nothing")
	if d := time.Since(t0); d > 3*time.Second {
		t.Fatalf("a source silent before its header was dropped after %v", d)
	}
	s := openRaw(t, e.addr, "silent-2", smallInfo("silent-2"), 0)
	t0 = time.Now()
	s.main.expectRefusal("the source sent nothing for")
	if d := time.Since(t0); d > 3*time.Second {
		t.Fatalf("a source silent while receiving was dropped after %v", d)
	}
	waitGone(t, e.dst, "silent-2")
}

// TestTooManyPreAuthConnections: connections that have not been
// authorised are bounded; one more is closed at once, without waiting for
// its handshake to time out.
func TestTooManyPreAuthConnections(t *testing.T) {
	e := newEnv(t, func(r *engine.Receiver) { r.MaxPreAuth = 2 })
	for range 2 {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	time.Sleep(100 * time.Millisecond) // both accepted and waiting for a hello
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	t0 := time.Now()
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("the connection over the limit: read %v, want it closed at once", err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Fatalf("closed after %v", d)
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// TestOversizedHelloRefused: before authorisation a connection may send
// no record larger than a hello needs.
func TestOversizedHelloRefused(t *testing.T) {
	e := newEnv(t, nil)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w := wire.NewWriter(c)
	_ = w.WriteStreamHeader()
	_ = w.Write(wire.TypeControl, make([]byte, 1<<20))
	_ = w.Flush()
	r := wire.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := r.ReadStreamHeader(); err != nil {
		t.Fatal(err)
	}
	rec, err := r.Next()
	if err != nil {
		t.Fatal(err)
	}
	m, err := wire.ParseControl(rec.Body)
	if err != nil || m.Kind != "error" || !strings.Contains(m.Message, "longer than MaxBody") {
		t.Fatalf("answer %+v %v", m, err)
	}
}

// TestPostCopyVerificationFailureDiscards: contract C2. A post-copy whose
// memory does not match the source's manifest after the domain resumed
// here destroys the domain here, tells the source "discarded" (it may
// resume its paused copy) and reports EventDiscarded; nothing of the
// domain is left on this host.
func TestPostCopyVerificationFailureDiscards(t *testing.T) {
	e := newEnv(t, nil)
	discarded := make(chan engine.Event, 1)
	events := e.recv.Events
	e.recv.Events = func(id string, ev engine.Event) {
		if ev.Kind == engine.EventDiscarded {
			discarded <- ev
		}
		events(id, ev)
	}
	_, dom := e.domain("disc", "16Mi", sim.Profile{Seed: 3})
	if err := dom.Pause(); err != nil {
		t.Fatal(err)
	}
	state, err := dom.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	info := dom.Info()
	n := info.MemoryBytes / xenmem.PageSize
	s := openRaw(t, e.addr, "disc", info, wire.FlagPostCopy)

	s.main.send(wire.TypeState, state)
	all := make([]uint64, (n+63)/64)
	for i := range all {
		all[i] = ^uint64(0)
	}
	s.main.send(wire.TypeBitmap, wire.MarshalBitmap(nil, 0, n, all))
	s.data.ctl(wire.Control{Kind: "flush", Message: "postcopy"})
	s.main.ctl(wire.Control{Kind: "postcopy"})
	s.main.expect("ready")
	s.main.ctl(wire.Control{Kind: "go"})
	s.main.expect("resumed")

	// Push every page as a zero page; the manifest says page 7 is not.
	pfns := make([]uint64, 0, wire.MaxBatchPages)
	for p := range n {
		pfns = append(pfns, p)
		if len(pfns) == cap(pfns) || p == n-1 {
			s.data.send(wire.TypeZeroPages, wire.MarshalPFNs(nil, pfns))
			pfns = pfns[:0]
		}
	}
	s.data.ctl(wire.Control{Kind: "flush", Message: "pushed"})
	zero := dedup.HashPage(make([]byte, xenmem.PageSize))
	hashes := make([][16]byte, n)
	for i := range hashes {
		hashes[i] = zero
	}
	other := make([]byte, xenmem.PageSize)
	other[0] = 1
	hashes[7] = dedup.HashPage(other)
	s.main.send(wire.TypeManifest, wire.MarshalManifest(nil, 0, hashes))
	s.main.ctl(wire.Control{Kind: "pushed"})
	m := s.main.expect("discarded")
	if !strings.Contains(m.Message, "1 of 4096 pages do not match") {
		t.Fatalf("discarded says %q", m.Message)
	}
	select {
	case ev := <-discarded:
		if !errors.Is(ev.Err, engine.ErrDiscarded) {
			t.Fatalf("EventDiscarded carries %v", ev.Err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no EventDiscarded")
	}
	waitGone(t, e.dst, "disc")
}

// panicHost is a destination host whose CreateTarget panics for one
// domain name: a stand-in for any bug the network can reach.
type panicHost struct {
	xenmem.Host
	name string
}

func (h panicHost) CreateTarget(ctx context.Context, info xenmem.DomainInfo) (xenmem.TargetDomain, error) {
	if info.Name == h.name {
		var nilMap map[string]int
		nilMap["boom"]++ // panics
	}
	return h.Host.CreateTarget(ctx, info)
}

// TestPanicFailsOnlyThatMigration: a panic while receiving a migration is
// recovered at the connection's boundary: that migration fails with
// ErrInternal and the receiver serves the next one.
func TestPanicFailsOnlyThatMigration(t *testing.T) {
	failed := make(chan error, 4)
	e := newEnv(t, nil)
	e.recv.Host = panicHost{Host: e.dst, name: "boom"}
	events := e.recv.Events
	e.recv.Events = func(id string, ev engine.Event) {
		if ev.Kind == engine.EventFailed {
			failed <- ev.Err
		}
		events(id, ev)
	}
	main, _ := dialRaw(t, e.addr, wire.Control{MigrationID: "boom", Streams: 1, Message: "main"})
	main.send(wire.TypeHeader, header(t, smallInfo("boom"), 4096, 0))
	main.expectRefusal("panic")
	select {
	case err := <-failed:
		if !errors.Is(err, engine.ErrInternal) {
			t.Fatalf("failure %v does not wrap ErrInternal", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no EventFailed")
	}
	e.migrateOne("after-boom")
}

// TestIdleTimeoutSparesLongPhases: the idle timeout counts the source's
// silence on all of a migration's connections, so phases that last several
// times longer, with the main connection quiet throughout, do not trip it.
// (The timeout must exceed the source's own pauses: a batch's wait for
// the link's bandwidth, its work between rounds; -race slows the latter.)
func TestIdleTimeoutSparesLongPhases(t *testing.T) {
	e := newEnv(t, func(r *engine.Receiver) { r.IdleTimeout = 1500 * time.Millisecond })
	for _, st := range []engine.Strategy{engine.StrategyPreCopy, engine.StrategyPostCopy, engine.StrategyHybridDedup} {
		t.Run(string(st), func(t *testing.T) {
			name := "long-" + strings.ReplaceAll(string(st), "+", "-")
			disk, dom := e.domain(name, "64Mi", sim.Profile{Seed: 9, Zero: 0.3, Disk: 0.3, DirtyMiBps: 8, ReadMiBps: 8})
			hooks := engine.Hooks{Log: testlog.New(t)}
			if st == engine.StrategyHybridDedup {
				hooks.Disks = e.catalog(disk)
			}
			t0 := time.Now()
			res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: st, LinkBytesPerSec: 12 << 20, MigrationID: name}, hooks)
			if err != nil || !res.Verified {
				t.Fatalf("verified=%v err=%v", res.Verified, err)
			}
			t.Logf("%s took %v with a 1.5 s idle timeout", st, time.Since(t0).Round(time.Millisecond))
		})
	}
}

// TestFallbackAnswerAfterCompleteMarker: a reference that fails at the
// destination is asked for again; the source may answer after its
// "complete" marker (it serves fallbacks while the destination checks),
// and that answer, asked for, is accepted there.
func TestFallbackAnswerAfterCompleteMarker(t *testing.T) {
	e := newEnv(t, nil)
	disk, dom := e.domain("fb", "16Mi", sim.Profile{Seed: 4})
	if err := dom.Pause(); err != nil {
		t.Fatal(err)
	}
	state, err := dom.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	info := dom.Info()
	if len(info.Disks) != 1 || info.Disks[0].Path != disk {
		t.Fatalf("source disks %+v", info.Disks)
	}
	n := info.MemoryBytes / xenmem.PageSize
	s := openRaw(t, e.addr, "fb", info, wire.FlagDedup)
	pfns := make([]uint64, 0, wire.MaxBatchPages)
	for p := range n {
		if p != 5 {
			pfns = append(pfns, p)
		}
		if len(pfns) == cap(pfns) || p == n-1 {
			s.data.send(wire.TypeZeroPages, wire.MarshalPFNs(nil, pfns))
			pfns = pfns[:0]
		}
	}
	// A reference whose hash does not match the disk: stale.
	s.data.send(wire.TypeDiskRefs, wire.MarshalDiskRefs(nil, []wire.DiskRef{{PFN: 5, Disk: 0, Offset: 0, Hash: [16]byte{1}}}))
	s.data.ctl(wire.Control{Kind: "flush", Message: "complete"})
	_ = s.main.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		rec, err := s.main.r.Next()
		if err != nil {
			t.Fatalf("waiting for the fallback request: %v", err)
		}
		if rec.Type == wire.TypeRequest {
			reason, got, err := wire.ParseRequest(rec.Body, nil)
			if err != nil || reason != wire.ReasonFallback || len(got) != 1 || got[0] != 5 {
				t.Fatalf("request %d %v %v, want a fallback for page 5", reason, got, err)
			}
			break
		}
	}
	page := make([]byte, xenmem.PageSize)
	page[9] = 42
	s.data.send(wire.TypePages, wire.PagesPrefix(nil, []uint64{5}, 0), page)
	zero := dedup.HashPage(make([]byte, xenmem.PageSize))
	hashes := make([][16]byte, n)
	for i := range hashes {
		hashes[i] = zero
	}
	hashes[5] = dedup.HashPage(page)
	s.main.send(wire.TypeState, state)
	s.main.send(wire.TypeManifest, wire.MarshalManifest(nil, 0, hashes))
	s.main.ctl(wire.Control{Kind: "complete"})
	s.main.expect("ready")
	s.main.ctl(wire.Control{Kind: "go"})
	s.main.expect("resumed")
}
