package dedup

// Catalog is the source's view of the disks of one domain; a disk's number
// is its position. It is read-only after NewCatalog and safe for concurrent
// use (Lookup is lock-free, and Refresh swaps tables atomically underneath).
type Catalog struct {
	indexes []*Index
}

// NewCatalog returns a catalog of the given indexes; disk number i is
// indexes[i]. A nil index stands for a disk without an index (never matched).
func NewCatalog(indexes ...*Index) *Catalog {
	return &Catalog{indexes: append([]*Index(nil), indexes...)}
}

// Disks returns the number of disks in the catalog.
func (c *Catalog) Disks() int { return len(c.indexes) }

// Class is how a page crosses the wire.
type Class uint8

const (
	// ClassFull: the page content is sent.
	ClassFull Class = iota
	// ClassZero: the page is all zeros; only its number is sent.
	ClassZero
	// ClassDisk: a block of one of the domain's disks had the same hash when
	// it was indexed; a Ref is sent and the destination reads and verifies
	// the block.
	ClassDisk
)

func (c Class) String() string {
	switch c {
	case ClassFull:
		return "full"
	case ClassZero:
		return "zero"
	case ClassDisk:
		return "disk"
	}
	return "unknown"
}

// Ref names a disk block believed equal to a page: disk number in the
// domain's disk list, byte offset (a multiple of BlockSize) and the page's
// full hash, which the destination checks the block against.
type Ref struct {
	Disk   uint32
	Offset int64
	Hash   Hash
}

// Classify hashes the page once and classifies it: all zeros → ClassZero
// (with the precomputed hash of a zero page); found in one of the disks'
// indexes (first disk first) → ClassDisk with its Ref; else ClassFull. The
// page's hash is returned in every case so the caller can reuse it for the
// manifest.
func (c *Catalog) Classify(page []byte) (Class, Hash, Ref) {
	if IsZero(page) {
		if len(page) == BlockSize {
			return ClassZero, zeroHash, Ref{}
		}
		return ClassZero, HashPage(page), Ref{}
	}
	h := HashPage(page)
	if len(page) == BlockSize {
		k := keyOf(&h)
		for d, ix := range c.indexes {
			if ix == nil {
				continue
			}
			s := ix.cur.Load()
			if s == nil {
				continue
			}
			if blk, ok := s.lookup(k); ok {
				return ClassDisk, h, Ref{Disk: uint32(d), Offset: int64(blk) * BlockSize, Hash: h}
			}
		}
	}
	return ClassFull, h, Ref{}
}

// MarkStale tells the catalog that a reference with page hash h came back
// as a fallback (the destination found the block changed or could not read
// it). The block Classify chose for h (the first disk's hit) is marked
// stale, so later pages with this content go to the next disk holding it or
// are sent in full, instead of as references that would fail again. The
// source only needs the hash it sent.
func (c *Catalog) MarkStale(h Hash) {
	k := keyOf(&h)
	for _, ix := range c.indexes {
		if ix == nil {
			continue
		}
		s := ix.cur.Load()
		if s == nil {
			continue
		}
		if blk, ok := s.lookup(k); ok {
			ix.MarkStale(int64(blk) * BlockSize)
			return
		}
	}
}
