package xlstream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/zeebo/xxh3"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Early resume through the stock toolstack (docs/xen-postcopy.md). The
// source keeps back the contents of an HVM/PVH domain's RAM: each page's
// newest copy goes to a spool file, and the record xl's restore gets says
// "allocate, no data" (XALLOC) for it. Before the libxc END the source
// sends the manifest (every held pfn and the hash of its newest copy);
// the destination pages those gfns out before xl lets the domain run and
// fetches them on demand (DEMAND -> LAZYPAGE) ahead of the source's push.
//
// Frame kinds (numbers apart from the pre-copy ones):
//
//	LAZYHELLO    source  {version u32, name len u16, name}: held pages follow
//	LAZYMANIFEST source  {n u32, n x {pfn u64, xxh3 u64}}
//	LAZYPAGE     source  {pfn u64, page}: a demand answer or the push
//	DEMAND       dest    {pfn u64}
//	LAZYPAGESZ   source  {n u32, n x pfn u64, zstd frame of the n pages}:
//	             the push, compressed (only to a destination that
//	             publishes the zstd codec: SendOptions.Compress)
const (
	FrameLazyHello    = 40
	FrameLazyManifest = 41
	FrameLazyPage     = 42
	FrameDemand       = 43
	FrameLazyPagesZ   = 44
)

// lazyBatch is how many pushed pages go in one LAZYPAGESZ, and how many a
// demand answer may wait behind (the push flushes after each batch);
// maxLazyBatch bounds what a destination accepts.
const (
	lazyBatch    = 8
	maxLazyBatch = 64
)

const (
	lazyVersion = 1
	// manifestChunk bounds a LAZYMANIFEST frame to 64 KiB of entries.
	manifestChunk = 4096
	// MaxLazyPFN bounds the pfns either side keeps state for (per-pfn
	// arrays): 64 GiB of guest memory.
	MaxLazyPFN = 1 << 24
	// The legacy special region below 4 GiB (Xen's special pages, ACPI
	// info, ioreq pages) always travels in the stream: dom0's daemons map
	// those pages before the domain runs, and a pager cannot serve them.
	specialLow, specialHigh = 0xf0000, 0x100000
)

// ErrLazyRefused: the destination cannot take a domain lazily.
var ErrLazyRefused = errors.New("early resume refused")

// LazyEntry is one held page of the manifest.
type LazyEntry struct {
	PFN  uint64
	Hash uint64
}

// PageHash is the hash the manifest carries for a page.
func PageHash(page []byte) uint64 { return xxh3.Hash(page) }

// Holdable says whether pfn may be held back.
func Holdable(pfn uint64) bool {
	return pfn < MaxLazyPFN && (pfn < specialLow || pfn >= specialHigh)
}

// LazySource is the source's side: the spool and the manifest.
//
// Invariants: held has a bit for every pfn whose contents came in the
// stream exactly once, that copy being in the spool at pfn*PageSize with
// hashes[pfn] its hash (a pfn that comes again is sent in full); sent marks
// pfns already sent to the destination (by demand or push).
type LazySource struct {
	f      *os.File
	name   string
	path   string
	mu     sync.Mutex
	hashes []uint64
	held   xenmem.Bitmap
	seen   xenmem.Bitmap // pfns whose contents came in the stream at least once
	sent   xenmem.Bitmap
	nHeld  int
	buf    []byte
}

// NewLazySource creates the spool dir/name (dir should be storage the
// destination can also read: it is then the domain's only copy of the held
// pages if this process dies after the go).
func NewLazySource(dir, name string) (*LazySource, error) {
	if err := checkSpoolName(name); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool directory: %w", err)
	}
	p := filepath.Join(dir, name)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create spool: %w", err)
	}
	return &LazySource{f: f, name: name, path: p}, nil
}

func checkSpoolName(name string) error {
	if name == "" || len(name) > 128 || strings.ContainsAny(name, "/\\\x00") || name == "." || name == ".." {
		return fmt.Errorf("spool name %q: a plain file name of at most 128 bytes is needed", name)
	}
	return nil
}

// Hold rewrites a PAGE_DATA record: each holdable page with contents goes
// to the spool and its entry becomes XALLOC without data. It returns the
// rewritten record (raw) and its parse.
func (l *LazySource) Hold(p *PageRecord) (*PageRecord, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := &PageRecord{Entries: make([]uint64, len(p.Entries))}
	keep := 0
	di := 0
	var kept [][]byte
	run, runStart := l.buf[:0], uint64(0)
	defer func() { l.buf = run[:0] }()
	for i, e := range p.Entries {
		out.Entries[i] = e
		t := PFNType(e)
		if !pageHasData(t) {
			continue
		}
		pg := p.Data(di)
		di++
		pfn := PFN(e)
		if !Holdable(pfn) || l.seen.Has(pfn) {
			// A page sent again was dirtied while the domain ran: it
			// belongs to the working set, which goes before the resume
			// (a guest's hypercalls read their arguments from such pages
			// and fail, not fault, on a paged-out one). Its held copy is
			// stale from now on.
			if l.held.Has(pfn) {
				l.held.Clear(pfn)
				l.nHeld--
			}
			kept = append(kept, pg)
			keep++
			continue
		}
		l.seen.Grow(pfn + 1)
		l.seen.Set(pfn)
		// Consecutive pfns go to the spool in one write (a record of
		// round 0 is one run): on network storage a write per page
		// would bound the whole stream.
		if len(run) > 0 && pfn != runStart+uint64(len(run)/PageSize) {
			if err := l.spool(runStart, run); err != nil {
				return nil, err
			}
			run = run[:0]
		}
		if len(run) == 0 {
			runStart = pfn
		}
		run = append(run, pg...)
		if need := int(pfn) + 1; need > len(l.hashes) {
			l.hashes = append(l.hashes, make([]uint64, need-len(l.hashes))...)
		}
		l.hashes[pfn] = PageHash(pg)
		l.held.Grow(pfn + 1)
		if !l.held.Test(pfn) {
			l.held.Set(pfn)
			l.nHeld++
		}
		out.Entries[i] = e&^(0xf<<pfnTypeShift) | PageXAlloc<<pfnTypeShift
	}
	if len(run) > 0 {
		if err := l.spool(runStart, run); err != nil {
			return nil, err
		}
	}
	body := 8 + 8*len(out.Entries) + keep*PageSize
	raw := make([]byte, 0, 8+body)
	raw = binary.LittleEndian.AppendUint32(raw, RecPageData)
	raw = binary.LittleEndian.AppendUint32(raw, uint32(body))
	raw = binary.LittleEndian.AppendUint32(raw, uint32(len(out.Entries)))
	raw = binary.LittleEndian.AppendUint32(raw, 0)
	for _, e := range out.Entries {
		raw = binary.LittleEndian.AppendUint64(raw, e)
	}
	for _, pg := range kept {
		raw = append(raw, pg...)
	}
	out.Raw, out.NData = raw, keep
	return out, nil
}

func (l *LazySource) spool(first uint64, pages []byte) error {
	if _, err := l.f.WriteAt(pages, int64(first)*PageSize); err != nil {
		return fmt.Errorf("spool pfns %#x+%d: %w", first, len(pages)/PageSize, err)
	}
	return nil
}

// Sync makes the spool durable: called before the go, after which it may
// be the domain's only copy of the held pages.
func (l *LazySource) Sync() error {
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("sync the spool %s: %w", l.path, err)
	}
	return nil
}

// Held is the number of pfns held back.
func (l *LazySource) Held() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nHeld
}

// manifestFrames returns the manifest as LAZYMANIFEST bodies.
func (l *LazySource) manifestFrames() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	var frames [][]byte
	var cur []byte
	n := 0
	flush := func() {
		if n == 0 {
			return
		}
		binary.LittleEndian.PutUint32(cur[0:], uint32(n))
		frames = append(frames, cur)
		cur, n = nil, 0
	}
	for pfn := l.held.Next(0); pfn < l.held.Len(); pfn = l.held.Next(pfn + 1) {
		if cur == nil {
			cur = make([]byte, 4, 4+16*manifestChunk)
		}
		cur = binary.LittleEndian.AppendUint64(cur, pfn)
		cur = binary.LittleEndian.AppendUint64(cur, l.hashes[pfn])
		if n++; n == manifestChunk {
			flush()
		}
	}
	flush()
	return frames
}

// page reads pfn's newest copy from the spool into a LAZYPAGE body and
// checks it against the hash taken when xl gave it: a spool that does not
// hold what was written fails here, not in the guest. ok is false when
// pfn is not held or was sent already (and force is false).
func (l *LazySource) page(pfn uint64, force bool) ([]byte, bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.held.Has(pfn) || (!force && l.sent.Has(pfn)) {
		return nil, false, nil
	}
	b := make([]byte, 8+PageSize)
	binary.LittleEndian.PutUint64(b, pfn)
	if _, err := l.f.ReadAt(b[8:], int64(pfn)*PageSize); err != nil {
		return nil, false, fmt.Errorf("read pfn %#x from the spool: %w", pfn, err)
	}
	if PageHash(b[8:]) != l.hashes[pfn] {
		return nil, false, fmt.Errorf("spool %s: pfn %#x does not match its hash", l.path, pfn)
	}
	l.sent.Grow(pfn + 1)
	l.sent.Set(pfn)
	return b, true, nil
}

// nextUnsent returns the first held, unsent pfn at or after from.
func (l *LazySource) nextUnsent(from uint64) (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for pfn := l.held.Next(from); pfn < l.held.Len(); pfn = l.held.Next(pfn + 1) {
		if !l.sent.Has(pfn) {
			return pfn, true
		}
	}
	return 0, false
}

// Close closes the spool; Remove deletes it too (once the destination has
// every page).
func (l *LazySource) Close() error { return l.f.Close() }

// Remove closes and deletes the spool.
func (l *LazySource) Remove() error {
	l.f.Close()
	return os.Remove(l.path)
}

// LazySink is the destination's side of early resume.
type LazySink interface {
	// Hello: the source holds pages back; name is its spool's file name.
	// An error refuses the migration before xl resumes anything.
	Hello(name string) error
	// Manifest adds held pfns and their hashes (before the libxc END).
	Manifest(entries []LazyEntry) error
	// Page delivers a held page (a demand answer or the push); page is
	// valid only during the call.
	Page(pfn uint64, page []byte) error
	// Start gives the sink the function that asks the source for a page.
	Start(demand func(pfn uint64) error)
	// Wait returns once every held page is in the domain (or it failed).
	Wait() error
	// Abort: the source's connection ended or sent garbage; the sink
	// must get the rest elsewhere (the spool) or fail Wait.
	Abort(err error)
}

// lazyHello is the LAZYHELLO body naming the spool.
func lazyHello(name string) []byte {
	b := binary.LittleEndian.AppendUint32(nil, lazyVersion)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(name)))
	return append(b, name...)
}

func parseLazyHello(b []byte) (string, error) {
	if len(b) < 6 || binary.LittleEndian.Uint32(b) != lazyVersion {
		return "", fmt.Errorf("%w: LAZYHELLO of %d bytes or unknown version", ErrBadFrame, len(b))
	}
	n := int(binary.LittleEndian.Uint16(b[4:]))
	if len(b) != 6+n {
		return "", fmt.Errorf("%w: LAZYHELLO name of %d bytes in a %d-byte frame", ErrBadFrame, n, len(b))
	}
	name := string(b[6:])
	if err := checkSpoolName(name); err != nil {
		return "", fmt.Errorf("%w: %v", ErrBadFrame, err)
	}
	return name, nil
}

func parseManifest(b []byte) ([]LazyEntry, error) {
	if len(b) < 4 {
		return nil, fmt.Errorf("%w: LAZYMANIFEST of %d bytes", ErrBadFrame, len(b))
	}
	n := int(binary.LittleEndian.Uint32(b))
	if n > manifestChunk || len(b) != 4+16*n {
		return nil, fmt.Errorf("%w: LAZYMANIFEST of %d entries in %d bytes", ErrBadFrame, n, len(b))
	}
	out := make([]LazyEntry, n)
	for i := range out {
		o := 4 + 16*i
		out[i] = LazyEntry{PFN: binary.LittleEndian.Uint64(b[o:]), Hash: binary.LittleEndian.Uint64(b[o+8:])}
		if !Holdable(out[i].PFN) {
			return nil, fmt.Errorf("%w: manifest holds pfn %#x, which may not be held", ErrBadFrame, out[i].PFN)
		}
	}
	return out, nil
}
