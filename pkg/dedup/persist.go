package dedup

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/zeebo/xxh3"
)

// Persisted index file (little-endian), one per disk in Options.StateDir,
// named "<dev>-<ino>.xfdedup" so a new generation overwrites the old one:
//
//	+0   magic "XFDEDUP\x01"           8 bytes
//	+8   version (1)                   u32
//	+12  block size (4096)             u32
//	+16  device (st_dev, or st_rdev)   u64
//	+24  inode                         u64
//	+32  size in bytes                 i64
//	+40  mtime in ns                   i64
//	+48  flags (bit 0: block device)   u32
//	+52  key bytes (12)                u32
//	+56  n (home range)                u64
//	+64  slots (n + slack)             u64
//	+72  entries                       u64
//	+80  path length L (<= 4096)       u32
//	+84  reserved (0)                  u32
//	+88  path, zero-padded to 8 bytes
//	     slots × {k0 u64, k1 u32, blk+1 u32}   16 bytes each
//	     xxh3-64 of every byte above   u64
//
// The file is written to a temporary name, synced and renamed, so a crash
// leaves either the old or the new file. Any mismatch (identity, checksum,
// shape) makes Open rebuild.
const (
	persistVersion = 1
	headerBytes    = 88
	maxPathLen     = 4096
)

var persistMagic = [8]byte{'X', 'F', 'D', 'E', 'D', 'U', 'P', 1}

// errIdentityChanged says the persisted index belongs to another generation
// of the disk.
var errIdentityChanged = errors.New("disk identity changed since the index was persisted")

func (ix *Index) statePath(id identity) string {
	return filepath.Join(ix.opts.StateDir, fmt.Sprintf("%x-%x.xfdedup", id.Dev, id.Ino))
}

// checksumWriter hashes everything written through it.
type checksumWriter struct {
	w io.Writer
	h *xxh3.Hasher
}

func (c *checksumWriter) Write(p []byte) (int, error) {
	c.h.Write(p)
	return c.w.Write(p)
}

func saveIndex(file, diskPath string, id identity, t *table) (err error) {
	if len(diskPath) > maxPathLen {
		diskPath = diskPath[:maxPathLen]
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(file), filepath.Base(file)+".tmp*")
	if err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	bw := bufio.NewWriterSize(tmp, 1<<20)
	cw := &checksumWriter{w: bw, h: xxh3.New()}

	hdr := make([]byte, headerBytes+(len(diskPath)+7)&^7)
	copy(hdr, persistMagic[:])
	le := binary.LittleEndian
	le.PutUint32(hdr[8:], persistVersion)
	le.PutUint32(hdr[12:], BlockSize)
	le.PutUint64(hdr[16:], id.Dev)
	le.PutUint64(hdr[24:], id.Ino)
	le.PutUint64(hdr[32:], uint64(id.Size))
	le.PutUint64(hdr[40:], uint64(id.MtimeNs))
	if id.Block {
		le.PutUint32(hdr[48:], 1)
	}
	le.PutUint32(hdr[52:], 12)
	le.PutUint64(hdr[56:], t.n)
	le.PutUint64(hdr[64:], uint64(len(t.slots)))
	le.PutUint64(hdr[72:], uint64(t.entries))
	le.PutUint32(hdr[80:], uint32(len(diskPath)))
	copy(hdr[headerBytes:], diskPath)
	if _, err := cw.Write(hdr); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	var buf [64 * entryBytes]byte
	for i := 0; i < len(t.slots); i += 64 {
		m := min(64, len(t.slots)-i)
		for j, e := range t.slots[i : i+m] {
			le.PutUint64(buf[j*16:], e.k0)
			le.PutUint32(buf[j*16+8:], e.k1)
			le.PutUint32(buf[j*16+12:], e.blk)
		}
		if _, err := cw.Write(buf[:m*16]); err != nil {
			return fmt.Errorf("dedup: persist index: %w", err)
		}
	}
	var sum [8]byte
	le.PutUint64(sum[:], cw.h.Sum64())
	if _, err := bw.Write(sum[:]); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	if err := os.Rename(tmp.Name(), file); err != nil {
		return fmt.Errorf("dedup: persist index: %w", err)
	}
	return nil
}

// loadIndex reads a persisted index and checks it belongs to disk
// generation id. Errors wrap os.ErrNotExist when there is no file.
func loadIndex(file string, id identity) (*table, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("load index %s: %w", file, err)
	}
	defer f.Close()
	h := xxh3.New()
	br := bufio.NewReaderSize(f, 1<<20)
	// read fills b and adds it to the checksum.
	read := func(b []byte) error {
		if _, err := io.ReadFull(br, b); err != nil {
			return err
		}
		h.Write(b)
		return nil
	}
	bad := func(format string, a ...any) error {
		return fmt.Errorf("load index %s: %s", file, fmt.Sprintf(format, a...))
	}

	hdr := make([]byte, headerBytes)
	if err := read(hdr); err != nil {
		return nil, bad("short header: %v", err)
	}
	le := binary.LittleEndian
	if [8]byte(hdr[:8]) != persistMagic {
		return nil, bad("bad magic")
	}
	if v := le.Uint32(hdr[8:]); v != persistVersion {
		return nil, bad("version %d, want %d", v, persistVersion)
	}
	if bs := le.Uint32(hdr[12:]); bs != BlockSize {
		return nil, bad("block size %d, want %d", bs, BlockSize)
	}
	got := identity{
		Dev:     le.Uint64(hdr[16:]),
		Ino:     le.Uint64(hdr[24:]),
		Size:    int64(le.Uint64(hdr[32:])),
		MtimeNs: int64(le.Uint64(hdr[40:])),
		Block:   le.Uint32(hdr[48:])&1 != 0,
	}
	if got != id {
		return nil, fmt.Errorf("load index %s: %w (persisted %s, now %s)", file, errIdentityChanged, got, id)
	}
	if kb := le.Uint32(hdr[52:]); kb != 12 {
		return nil, bad("key bytes %d, want 12", kb)
	}
	n, nslots, entries := le.Uint64(hdr[56:]), le.Uint64(hdr[64:]), le.Uint64(hdr[72:])
	blocks := uint64(id.Size / BlockSize)
	if n < 64 || n > 3*blocks+4096 || nslots != n+slackFor(n) || entries > blocks {
		return nil, bad("implausible shape n=%d slots=%d entries=%d for %d blocks", n, nslots, entries, blocks)
	}
	plen := le.Uint32(hdr[80:])
	if plen > maxPathLen {
		return nil, bad("path length %d", plen)
	}
	if err := read(make([]byte, (plen+7)&^7)); err != nil {
		return nil, bad("short path: %v", err)
	}

	t := &table{slots: make([]entry, nslots), n: n}
	var buf [64 * entryBytes]byte
	var prev entry
	for i := 0; i < len(t.slots); i += 64 {
		m := min(64, len(t.slots)-i)
		if err := read(buf[:m*16]); err != nil {
			return nil, bad("short table: %v", err)
		}
		for j := range m {
			e := entry{k0: le.Uint64(buf[j*16:]), k1: le.Uint32(buf[j*16+8:]), blk: le.Uint32(buf[j*16+12:])}
			if e.blk == 0 {
				continue
			}
			if uint64(e.blk) > blocks || (t.entries > 0 && !less(&prev, key{e.k0, e.k1})) || uint64(i+j) < t.home(e.k0) {
				return nil, bad("entry %d out of order or out of range", i+j)
			}
			t.slots[i+j] = e
			prev = e
			t.entries++
		}
	}
	if uint64(t.entries) != entries {
		return nil, bad("%d entries, header says %d", t.entries, entries)
	}
	var sum [8]byte
	if _, err := io.ReadFull(br, sum[:]); err != nil {
		return nil, bad("short checksum: %v", err)
	}
	if le.Uint64(sum[:]) != h.Sum64() {
		return nil, bad("checksum mismatch")
	}
	if _, err := br.ReadByte(); err != io.EOF {
		return nil, bad("trailing bytes after the checksum")
	}
	return t, nil
}
