package engine_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/internal/fuzzseed"
	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// The fuzz input of FuzzReceiver is a script of what up to four sources'
// connections send to a Receiver, in order:
//
//	chunk = flags u8 | length u24 LE | payload[length]
//	flags   bits 0-1  connection slot (dialled on first use)
//	        bit 2     framed: payload is {type u8, body}; the harness
//	                  writes it as one record with a correct checksum
//	                  (type bits 0-6 = wire type, bit 7 = wire.Optional)
//	        bit 3     on the chunk that opens the slot: no stream header
//	                  (otherwise the harness writes a valid one first)
//	        bit 4     half-close the slot after this chunk
//
// Raw payloads reach the framing and handshake checks; framed ones get
// past the checksum into the protocol, which is where the seeds, recorded
// from real migrations, start.
const (
	chunkSlots    = 4
	chunkFramed   = 1 << 2
	chunkNoHeader = 1 << 3
	chunkClose    = 1 << 4
	chunkHeadLen  = 4
)

type chunk struct {
	flags   byte
	payload []byte
}

func (c chunk) slot() int { return int(c.flags) % chunkSlots }

func encodeScript(chunks []chunk) []byte {
	var b []byte
	for _, c := range chunks {
		n := len(c.payload)
		b = append(b, c.flags, byte(n), byte(n>>8), byte(n>>16))
		b = append(b, c.payload...)
	}
	return b
}

func decodeScript(b []byte) []chunk {
	var out []chunk
	for len(b) >= chunkHeadLen {
		n := int(b[1]) | int(b[2])<<8 | int(b[3])<<16
		c := chunk{flags: b[0]}
		b = b[chunkHeadLen:]
		c.payload = b[:min(n, len(b))]
		b = b[len(c.payload):]
		out = append(out, c)
	}
	return out
}

func framedChunk(slot int, t wire.Type, body []byte) chunk {
	tb := byte(t & 0x7f)
	if t.IsOptional() {
		tb |= 0x80
	}
	return chunk{flags: byte(slot) | chunkFramed, payload: append([]byte{tb}, body...)}
}

func chunkType(b byte) wire.Type {
	t := wire.Type(b & 0x7f)
	if b&0x80 != 0 {
		t |= wire.Optional
	}
	return t
}

// fuzzHost is a destination host whose domains are plain memory: it
// refuses what does not fit its capacity, and it records every target so
// the harness can check that nothing is left half-created.
type fuzzHost struct {
	capacity uint64

	mu      sync.Mutex
	used    uint64
	targets []*fuzzTarget
}

func (h *fuzzHost) Info(context.Context) (xenmem.HostInfo, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return xenmem.HostInfo{Name: "fuzz", Backend: "fake", TotalMemoryBytes: h.capacity, FreeMemoryBytes: h.capacity - h.used, CPUs: 1}, nil
}

func (h *fuzzHost) Domains(context.Context) ([]xenmem.DomainInfo, error) { return nil, nil }

func (h *fuzzHost) OpenSource(context.Context, string) (xenmem.SourceDomain, error) {
	return nil, xenmem.ErrNotSupported
}

func (h *fuzzHost) CreateTarget(_ context.Context, info xenmem.DomainInfo) (xenmem.TargetDomain, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if info.MemoryBytes == 0 || info.MemoryBytes%xenmem.PageSize != 0 {
		return nil, fmt.Errorf("fuzz host: memory %d bytes", info.MemoryBytes)
	}
	if info.MemoryBytes > h.capacity-h.used {
		return nil, xenmem.ErrNoMemory
	}
	h.used += info.MemoryBytes
	t := &fuzzTarget{h: h, info: info, mem: make([]byte, info.MemoryBytes)}
	h.targets = append(h.targets, t)
	return t, nil
}

func (h *fuzzHost) Close() error { return nil }

// leftBehind lists targets that are neither destroyed nor resumed: a
// receiving domain nobody will ever run or clean up.
func (h *fuzzHost) leftBehind() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, t := range h.targets {
		if !t.destroyed.Load() && !t.resumed.Load() {
			out = append(out, t.info.Name)
		}
	}
	return out
}

type fuzzTarget struct {
	h                  *fuzzHost
	info               xenmem.DomainInfo
	mem                []byte
	state              []byte
	lazy               *fuzzLazy
	resumed, destroyed atomic.Bool
}

func (t *fuzzTarget) Info() xenmem.DomainInfo { return t.info }
func (t *fuzzTarget) NumPages() uint64        { return uint64(len(t.mem)) / xenmem.PageSize }
func (t *fuzzTarget) Memory() []byte          { return t.mem }
func (t *fuzzTarget) Ops() uint64             { return 0 }
func (t *fuzzTarget) Close() error            { return nil }

func (t *fuzzTarget) WritePages(pfns []uint64, data []byte) error {
	if len(data) != len(pfns)*xenmem.PageSize {
		return fmt.Errorf("fuzz target: %d bytes for %d pages", len(data), len(pfns))
	}
	for i, p := range pfns {
		if p >= t.NumPages() {
			return fmt.Errorf("fuzz target: pfn %d of %d", p, t.NumPages())
		}
		copy(t.mem[p*xenmem.PageSize:], data[i*xenmem.PageSize:(i+1)*xenmem.PageSize])
	}
	return nil
}

func (t *fuzzTarget) LoadState(s []byte) error { t.state = bytes.Clone(s); return nil }

func (t *fuzzTarget) StartLazy(present *xenmem.Bitmap) (xenmem.Lazy, error) {
	if present.Len() != t.NumPages() {
		return nil, fmt.Errorf("fuzz target: present bitmap of %d pages, domain has %d", present.Len(), t.NumPages())
	}
	l := &fuzzLazy{t: t, present: xenmem.NewBitmap(t.NumPages()), faults: make(chan xenmem.Fault)}
	l.present.Or(present)
	t.lazy = l
	return l, nil
}

func (t *fuzzTarget) Resume() error { t.resumed.Store(true); return nil }

func (t *fuzzTarget) Destroy() error {
	if t.destroyed.Swap(true) {
		return errors.New("fuzz target: destroyed twice")
	}
	t.h.mu.Lock()
	t.h.used -= t.info.MemoryBytes
	t.h.mu.Unlock()
	return nil
}

// fuzzLazy never faults (nobody runs the guest); it installs pages once.
type fuzzLazy struct {
	t         *fuzzTarget
	mu        sync.Mutex
	present   *xenmem.Bitmap
	faults    chan xenmem.Fault
	closeOnce sync.Once
}

func (l *fuzzLazy) Faults() <-chan xenmem.Fault { return l.faults }

func (l *fuzzLazy) Install(pfn uint64, data []byte) error {
	return l.InstallRun(pfn, 1, data, make([]bool, 1))
}

func (l *fuzzLazy) InstallZero(pfn uint64) error { return l.InstallRun(pfn, 1, nil, make([]bool, 1)) }

func (l *fuzzLazy) InstallRun(first uint64, n int, data []byte, exists []bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n < 0 || first+uint64(n) > l.t.NumPages() || first+uint64(n) < first || len(exists) < n || (data != nil && len(data) != n*xenmem.PageSize) {
		return fmt.Errorf("fuzz lazy: run of %d pages at %d", n, first)
	}
	for i := range n {
		p := first + uint64(i)
		if exists[i] = l.present.Test(p); exists[i] {
			continue
		}
		dst := l.t.mem[p*xenmem.PageSize : (p+1)*xenmem.PageSize]
		if data == nil {
			clear(dst)
		} else {
			copy(dst, data[i*xenmem.PageSize:])
		}
		l.present.Set(p)
	}
	return nil
}

func (l *fuzzLazy) Present(pfn uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return pfn < l.present.Len() && l.present.Test(pfn)
}

func (l *fuzzLazy) Close() error {
	l.closeOnce.Do(func() { close(l.faults) })
	return nil
}

// Limits of one FuzzReceiver run.
const (
	fuzzHostMemory = 64 << 20
	// fuzzAllocLimit bounds what one run may allocate: the host's memory
	// for a target, per-page state for it, and per-connection buffers.
	fuzzAllocLimit = 256 << 20
	// fuzzSettle is how long a run waits for the receiver to finish with
	// what it was sent before it checks and cancels.
	fuzzSettle = 300 * time.Millisecond
	fuzzQuiet  = 30 * time.Millisecond
	// The shared disk of every run: the recorded migrations' domains had
	// this one, so their references verify when replayed.
	fuzzDiskSize = 64 << 10
	fuzzDiskSeed = 1
)

var probeSeq atomic.Int64

// drain reads what the receiver sends on c until it closes, noting when.
func drain(c net.Conn, activity *atomic.Int64) {
	buf := make([]byte, 32<<10)
	for {
		_, err := c.Read(buf)
		activity.Store(time.Now().UnixNano())
		if err != nil {
			return
		}
	}
}

// settle waits until done is closed, or the receiver sent nothing for
// fuzzQuiet, or fuzzSettle passed.
func settle(done <-chan struct{}, activity *atomic.Int64) {
	start := time.Now()
	activity.Store(start.UnixNano())
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case now := <-tick.C:
			if now.Sub(start) > fuzzSettle || now.UnixNano()-activity.Load() > int64(fuzzQuiet) {
				return
			}
		}
	}
}

// probe opens a new migration's main connection and expects a welcome: the
// receiver still takes migrations.
func probe(addr string) error {
	nc, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(5 * time.Second))
	w := wire.NewWriter(nc)
	hello, err := wire.MarshalControl(nil, &wire.Control{Kind: "hello", MigrationID: fmt.Sprintf("fuzz-probe-%d", probeSeq.Add(1)), Message: "main", Streams: 1})
	if err != nil {
		return err
	}
	if err := w.WriteStreamHeader(); err != nil {
		return err
	}
	if err := w.Write(wire.TypeControl, hello); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	r := wire.NewReader(nc)
	if err := r.ReadStreamHeader(); err != nil {
		return err
	}
	rec, err := r.Next()
	if err != nil {
		return err
	}
	c, err := wire.ParseControl(rec.Body)
	if err != nil || rec.Type != wire.TypeControl || c.Kind != "hello" {
		return fmt.Errorf("answer %v %+v, %v", rec.Type, c, err)
	}
	return nil
}

// runScript plays chunks against a fresh Receiver on loopback TCP and
// checks what must hold whatever the sources sent: no panic (a panic in
// any goroutine ends the fuzz process), a bounded allocation, the receiver
// still welcomes a new migration, no receiving domain left half-created,
// and no goroutine left once its context ends.
func runScript(t *testing.T, disk string, chunks []chunk) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	allocBefore := ms.TotalAlloc
	goBefore := runtime.NumGoroutine()

	host := &fuzzHost{capacity: fuzzHostMemory}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := logr.Discard()
	if os.Getenv("XENFERRY_FUZZ_LOG") != "" {
		log = testlog.New(t)
	}
	r := &engine.Receiver{Host: host, Log: log, RecoveryTimeout: 100 * time.Millisecond,
		// Never the sender's paths: a fuzzed header names any file.
		DiskPath: func(string, xenmem.Disk) string { return disk }}
	served := make(chan struct{})
	go func() { defer close(served); _ = r.Serve(ctx, ln) }()

	var conns [chunkSlots]*net.TCPConn
	var dead [chunkSlots]bool
	var drains sync.WaitGroup
	var ws [chunkSlots]*wire.Writer
	var activity atomic.Int64 // when the receiver last sent something
	// Closed on a failed check too, so that the next input starts clean.
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	for _, c := range chunks {
		s := c.slot()
		if dead[s] {
			continue
		}
		if conns[s] == nil {
			nc, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
			if err != nil {
				t.Fatalf("dial the receiver: %v", err)
			}
			tc := nc.(*net.TCPConn)
			_ = tc.SetLinger(0) // no TIME_WAIT: a fuzz run dials thousands
			conns[s], ws[s] = tc, wire.NewWriter(tc)
			drains.Add(1)
			go func() { defer drains.Done(); drain(tc, &activity) }()
			if c.flags&chunkNoHeader == 0 {
				_ = ws[s].WriteStreamHeader()
			}
		}
		_ = conns[s].SetWriteDeadline(time.Now().Add(fuzzSettle))
		if c.flags&chunkFramed != 0 && len(c.payload) > 0 {
			err = ws[s].Write(chunkType(c.payload[0]), c.payload[1:])
		} else if err = ws[s].Flush(); err == nil {
			_, err = conns[s].Write(c.payload)
		}
		if err == nil {
			err = ws[s].Flush()
		}
		if err == nil && c.flags&chunkClose != 0 {
			err = conns[s].CloseWrite()
		}
		dead[s] = err != nil
	}
	done := make(chan struct{})
	go func() { drains.Wait(); close(done) }()
	// Let the receiver finish with what it got: until it closed every
	// connection, or went quiet (a source would wait for an answer that
	// a script cannot give), then half-close and let it see the ends.
	settle(done, &activity)
	for _, c := range conns {
		if c != nil {
			_ = c.CloseWrite()
		}
	}
	settle(done, &activity)
	if err := probe(ln.Addr().String()); err != nil {
		t.Fatalf("after the script the receiver does not welcome a new migration: %v", err)
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	cancel()
	<-served
	<-done
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > goBefore && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goBefore {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines left behind after the receiver's context ended:\n%s", n-goBefore, buf[:runtime.Stack(buf, true)])
	}
	if left := host.leftBehind(); len(left) > 0 {
		t.Fatalf("receiving domains neither resumed nor destroyed: %v", left)
	}
	runtime.ReadMemStats(&ms)
	if a := ms.TotalAlloc - allocBefore; a > fuzzAllocLimit {
		t.Fatalf("one run allocated %d MiB (limit %d MiB)", a>>20, fuzzAllocLimit>>20)
	}
}

// FuzzReceiver feeds scripted source connections (see chunk) to a real
// engine.Receiver on loopback with a fake host: see runScript for what
// must hold. Run as root or not; no userfaultfd is needed.
// Run: go test -run '^$' -fuzz '^FuzzReceiver$' ./pkg/engine
func FuzzReceiver(f *testing.F) {
	// The disk the seeds' references point into (the same generator).
	disk := filepath.Join(f.TempDir(), "disk.img")
	if err := sim.GenerateDisk(disk, fuzzDiskSize, fuzzDiskSeed); err != nil {
		f.Fatal(err)
	}
	for _, s := range handmadeScripts() {
		f.Add(encodeScript(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		runScript(t, disk, decodeScript(b))
	})
}

// handmadeScripts are short protocol openings: a hello alone, a hello and
// a header, a hello on a data stream for nobody, raw garbage.
func handmadeScripts() [][]chunk {
	ctl := func(c wire.Control) []byte {
		b, err := wire.MarshalControl(nil, &c)
		if err != nil {
			panic(err)
		}
		return b
	}
	hdr := wire.Header{Version: wire.Version, PageShift: wire.PageShift, NumPages: 16,
		Config: []byte(`{"name":"fz","memoryBytes":65536,"vcpus":1,"disks":[{"id":"xvda","path":"/x"}]}`)}
	main := framedChunk(0, wire.TypeControl, ctl(wire.Control{Kind: "hello", MigrationID: "fz", Message: "main", Streams: 1}))
	return [][]chunk{
		{main},
		{main, framedChunk(0, wire.TypeHeader, hdr.Marshal(nil))},
		{main, framedChunk(0, wire.TypeHeader, hdr.Marshal(nil)),
			framedChunk(1, wire.TypeControl, ctl(wire.Control{Kind: "hello", MigrationID: "fz", Message: "data", Stream: 0})),
			framedChunk(2, wire.TypeControl, ctl(wire.Control{Kind: "hello", MigrationID: "fz", Message: "prio"}))},
		{framedChunk(1, wire.TypeControl, ctl(wire.Control{Kind: "hello", MigrationID: "nobody", Message: "data"}))},
		{{flags: chunkNoHeader, payload: []byte("GET / HTTP/1.1\r\n\r\n")}},
		{{flags: chunkNoHeader | 3, payload: binary.LittleEndian.AppendUint32([]byte("XFERRY\r\n\x01\x00\x00\x00\x00\x00\x00\x00"), 7)}},
	}
}

// recorder is a TCP proxy in front of a receiver that records what each
// source connection sends, in arrival order across connections.
type recorder struct {
	ln, to string
	mu     sync.Mutex
	conns  int
	log    []recorded
}

type recorded struct {
	conn int
	b    []byte
}

func startRecorder(t *testing.T, to string) *recorder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	rec := &recorder{ln: ln.Addr().String(), to: to}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", to)
			if err != nil {
				c.Close()
				continue
			}
			rec.mu.Lock()
			id := rec.conns
			rec.conns++
			rec.mu.Unlock()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						rec.mu.Lock()
						rec.log = append(rec.log, recorded{id, bytes.Clone(buf[:n])})
						rec.mu.Unlock()
						_, _ = up.Write(buf[:n])
					}
					if err != nil {
						up.Close()
						return
					}
				}
			}()
		}
	}()
	return rec
}

// script turns the recording into chunks: each connection's records, in
// the order their last byte arrived, connections numbered by slot.
func (rec *recorder) script(t *testing.T) []chunk {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.conns > chunkSlots {
		t.Fatalf("%d connections, the script has %d slots", rec.conns, chunkSlots)
	}
	type parsed struct {
		ends []int64
		recs []wire.Record
	}
	all := make([][]byte, rec.conns)
	for _, e := range rec.log {
		all[e.conn] = append(all[e.conn], e.b...)
	}
	ps := make([]parsed, rec.conns)
	for i, b := range all {
		r := wire.NewReader(bytes.NewReader(b))
		if err := r.ReadStreamHeader(); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		for {
			x, err := r.Next()
			if err != nil {
				break
			}
			ps[i].recs = append(ps[i].recs, wire.Record{Type: x.Type, Body: bytes.Clone(x.Body)})
			ps[i].ends = append(ps[i].ends, r.Bytes())
		}
	}
	got := make([]int64, rec.conns)
	next := make([]int, rec.conns)
	var out []chunk
	for _, e := range rec.log {
		got[e.conn] += int64(len(e.b))
		p := &ps[e.conn]
		for next[e.conn] < len(p.recs) && p.ends[next[e.conn]] <= got[e.conn] {
			x := p.recs[next[e.conn]]
			out = append(out, framedChunk(e.conn, x.Type, x.Body))
			next[e.conn]++
		}
	}
	return out
}

// TestWriteFuzzSeeds records real migrations of a small simulated domain,
// one per strategy, into FuzzReceiver seeds (see internal/fuzzseed), and
// adds each recording cut in half.
func TestWriteFuzzSeeds(t *testing.T) {
	w := fuzzseed.New(t)
	requireRoot(t)
	w.Clear("FuzzReceiver")
	// Post-copy recordings fail today (testdata/fuzz-pending/README.md).
	pending := fuzzseed.New(t)
	pending.Root = filepath.Join("testdata", "fuzz-pending")
	pending.Clear("FuzzReceiver")
	dir := t.TempDir()
	src, err := sim.NewHost(sim.Config{Name: "src", Memory: "1Gi", CPUs: 2, StateDir: filepath.Join(dir, "src")}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	for i, st := range []engine.Strategy{engine.StrategyPreCopy, engine.StrategyPreCopyDedup, engine.StrategyPostCopy, engine.StrategyHybridDedup} {
		name := fmt.Sprintf("seed-%d", i)
		disk := filepath.Join(dir, name+".img")
		if err := sim.GenerateDisk(disk, fuzzDiskSize, fuzzDiskSeed); err != nil {
			t.Fatal(err)
		}
		// Two pages with contents (and two on the disk for +dedup): each
		// costs 4 KiB in the seed.
		p := sim.Profile{Zero: 0.875, Seed: int64(i)}
		if strings.HasSuffix(string(st), "+dedup") {
			p.Zero, p.Disk = 0.75, 0.125
		}
		if _, err := src.CreateDomain(context.Background(), sim.DomainSpec{Name: name, Memory: "64Ki", VCPUs: 1,
			Disks: []sim.DiskSpec{{ID: "xvda", Path: disk}}, Profile: p}); err != nil {
			t.Fatal(err)
		}
		dom, err := src.OpenSource(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		hooks := engine.Hooks{}
		if p.Disk > 0 {
			ix, err := dedup.Open(context.Background(), disk, dedup.Options{StateDir: filepath.Join(dir, "index")})
			if err != nil {
				t.Fatal(err)
			}
			defer ix.Close()
			hooks.Disks = dedup.NewCatalog(ix)
		}
		host := &fuzzHost{capacity: fuzzHostMemory}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		go (&engine.Receiver{Host: host, Log: logr.Discard(), DiskPath: func(string, xenmem.Disk) string { return disk }}).Serve(ctx, ln)
		rec := startRecorder(t, ln.Addr().String())
		res, err := engine.Migrate(context.Background(), dom, rec.ln, engine.Options{Strategy: st, Streams: 1, MigrationID: name}, hooks)
		dom.Close()
		cancel()
		if err != nil || !res.Verified {
			t.Fatalf("%s: %+v, %v", st, res, err)
		}
		time.Sleep(100 * time.Millisecond) // the proxy's last reads
		s := rec.script(t)
		label := strings.ReplaceAll(string(st), "+", "-")
		to := w
		if res.PostCopy {
			to = pending
			// Up to the "go": the domain resumes here on lazily
			// loaded memory, and the push never comes.
			for j, c := range s {
				if c.slot() == 0 && c.flags&chunkFramed != 0 && bytes.Contains(c.payload, []byte(`"kind":"go"`)) {
					w.Add("FuzzReceiver", label+"-until-go", encodeScript(s[:j+1]))
				}
			}
		}
		to.Add("FuzzReceiver", label, encodeScript(s))
		to.Add("FuzzReceiver", label+"-cut", encodeScript(s[:len(s)/2]))
		t.Logf("%s: %d chunks, %d pages full, %d zero, %d disk", st, len(s), res.Pages.Full, res.Pages.Zero, res.Pages.Disk)
	}
	for i, s := range handmadeScripts() {
		w.Add("FuzzReceiver", fmt.Sprintf("opening-%d", i), encodeScript(s))
	}
	// A header that claims 2^51 pages (and a configuration that agrees):
	// the session allocates per-page state for them before it asks the
	// host, and the process dies ("fatal error: out of memory").
	ctl, err := wire.MarshalControl(nil, &wire.Control{Kind: "hello", MigrationID: "big", Message: "main", Streams: 1})
	if err != nil {
		t.Fatal(err)
	}
	hdr := wire.Header{Version: wire.Version, PageShift: wire.PageShift, NumPages: 1 << 51,
		Config: []byte(`{"name":"big","memoryBytes":9223372036854775808,"vcpus":1}`)}
	pending.Add("FuzzReceiver", "header-claims-2p51-pages", encodeScript([]chunk{
		framedChunk(0, wire.TypeControl, ctl), framedChunk(0, wire.TypeHeader, hdr.Marshal(nil))}))
}
