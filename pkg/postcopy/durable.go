package postcopy

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Durable post-copy: once the domain runs at the destination, the source
// also writes every page the destination does not have yet to a mirror on
// shared storage, so that the destination can finish from it if the source
// host dies before the push completes.
//
// A mirror of migration ID is three files in the durable directory:
//
//	ID.pages  sparse memory image: page p at offset p*4096 (only pages the
//	          destination lacked at the switch-over are written)
//	ID.hashes the manifest: 16 bytes per page, the xxh3-128 of every page
//	          at the switch-over (all pages, so the destination can verify
//	          its whole memory against it)
//	ID.done   JSON {numPages, pages: [bitmap words]} written last, after
//	          both files are synced; its presence means the mirror is whole
//
// The destination reads a page only if ID.done exists, and checks each page
// against ID.hashes before installing it.

// MirrorPaths returns the three file names of a mirror.
func MirrorPaths(dir, id string) (pages, hashes, done string) {
	base := filepath.Join(dir, id)
	return base + ".pages", base + ".hashes", base + ".done"
}

type mirrorMeta struct {
	NumPages uint64   `json:"numPages"`
	Pages    []uint64 `json:"pages"` // bitmap words of the pages in ID.pages
}

// Mirror writes the mirror of one migration.
type Mirror struct {
	pages, hashes *os.File
	donePath      string
	numPages      uint64
}

// CreateMirror starts a mirror for numPages pages.
func CreateMirror(dir, id string, numPages uint64) (*Mirror, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("durable mirror dir %s: %w", dir, err)
	}
	p, h, d := MirrorPaths(dir, id)
	_ = os.Remove(d)
	pf, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("durable mirror: %w", err)
	}
	hf, err := os.OpenFile(h, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		pf.Close()
		return nil, fmt.Errorf("durable mirror: %w", err)
	}
	if err := pf.Truncate(int64(numPages) * xenmem.PageSize); err != nil {
		pf.Close()
		hf.Close()
		return nil, fmt.Errorf("durable mirror: size %s: %w", p, err)
	}
	return &Mirror{pages: pf, hashes: hf, donePath: d, numPages: numPages}, nil
}

// WriteHashes writes the manifest entries of pages [first, first+len(hs)).
func (m *Mirror) WriteHashes(first uint64, hs []dedup.Hash) error {
	buf := make([]byte, 0, len(hs)*16)
	for _, h := range hs {
		buf = append(buf, h[:]...)
	}
	if _, err := m.hashes.WriteAt(buf, int64(first)*16); err != nil {
		return fmt.Errorf("durable mirror: write hashes: %w", err)
	}
	return nil
}

// WritePage writes one page.
func (m *Mirror) WritePage(pfn uint64, page []byte) error {
	if _, err := m.pages.WriteAt(page, int64(pfn)*xenmem.PageSize); err != nil {
		return fmt.Errorf("durable mirror: write page %d: %w", pfn, err)
	}
	return nil
}

// Commit syncs both files and then marks the mirror whole.
func (m *Mirror) Commit(present *xenmem.Bitmap) error {
	if err := m.pages.Sync(); err != nil {
		return fmt.Errorf("durable mirror: sync pages: %w", err)
	}
	if err := m.hashes.Sync(); err != nil {
		return fmt.Errorf("durable mirror: sync hashes: %w", err)
	}
	b, err := json.Marshal(mirrorMeta{NumPages: m.numPages, Pages: present.Words()})
	if err != nil {
		return err
	}
	tmp := m.donePath + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("durable mirror: %w", err)
	}
	f, err := os.Open(tmp)
	if err == nil {
		_ = f.Sync()
		f.Close()
	}
	if err := os.Rename(tmp, m.donePath); err != nil {
		return fmt.Errorf("durable mirror: %w", err)
	}
	return nil
}

// Close closes the files (the mirror stays on disk).
func (m *Mirror) Close() error {
	return errors.Join(m.pages.Close(), m.hashes.Close())
}

// RemoveMirror deletes a mirror once the migration completed.
func RemoveMirror(dir, id string) {
	p, h, d := MirrorPaths(dir, id)
	_ = os.Remove(d)
	_ = os.Remove(p)
	_ = os.Remove(h)
}

// ErrNoMirror means there is no whole mirror to finish from.
var ErrNoMirror = errors.New("postcopy: no complete durable mirror")

// OpenedMirror is a whole mirror opened by the destination.
type OpenedMirror struct {
	pages, hashes *os.File
	present       *xenmem.Bitmap
}

// OpenMirror opens a whole mirror of numPages pages.
func OpenMirror(dir, id string, numPages uint64) (*OpenedMirror, error) {
	p, h, d := MirrorPaths(dir, id)
	b, err := os.ReadFile(d)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrNoMirror, d, err)
	}
	var meta mirrorMeta
	if err := json.Unmarshal(b, &meta); err != nil || meta.NumPages != numPages || uint64(len(meta.Pages)) != (numPages+63)/64 {
		return nil, fmt.Errorf("%w: %s is not a mirror of %d pages", ErrNoMirror, d, numPages)
	}
	pf, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoMirror, err)
	}
	hf, err := os.Open(h)
	if err != nil {
		pf.Close()
		return nil, fmt.Errorf("%w: %w", ErrNoMirror, err)
	}
	present := xenmem.NewBitmap(numPages)
	copy(present.Words(), meta.Pages)
	return &OpenedMirror{pages: pf, hashes: hf, present: present}, nil
}

// Has reports whether the mirror holds pfn.
func (o *OpenedMirror) Has(pfn uint64) bool { return pfn < o.present.Len() && o.present.Test(pfn) }

// Hash is the manifest entry of pfn.
func (o *OpenedMirror) Hash(pfn uint64) (dedup.Hash, error) {
	var h dedup.Hash
	if _, err := o.hashes.ReadAt(h[:], int64(pfn)*16); err != nil {
		return h, fmt.Errorf("durable mirror: read hash of page %d: %w", pfn, err)
	}
	return h, nil
}

// ReadPage reads pfn into dst and checks it against the manifest.
func (o *OpenedMirror) ReadPage(pfn uint64, dst []byte) error {
	if !o.Has(pfn) {
		return fmt.Errorf("durable mirror lacks page %d", pfn)
	}
	if _, err := o.pages.ReadAt(dst[:xenmem.PageSize], int64(pfn)*xenmem.PageSize); err != nil {
		return fmt.Errorf("durable mirror: read page %d: %w", pfn, err)
	}
	want, err := o.Hash(pfn)
	if err != nil {
		return err
	}
	if dedup.HashPage(dst[:xenmem.PageSize]) != want {
		return fmt.Errorf("durable mirror: page %d does not match its hash", pfn)
	}
	return nil
}

// Close closes the mirror's files.
func (o *OpenedMirror) Close() error { return errors.Join(o.pages.Close(), o.hashes.Close()) }
