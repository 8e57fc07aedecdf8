// Package dedup finds guest pages that already sit on the domain's disks and
// resolves such references on the destination.
//
// # Source side: Index and Catalog
//
// An Index covers one disk (raw image file or block device). It maps the
// content hash of every non-zero 4 KiB block at a 4 KiB-aligned offset to that
// offset. The hash is xxh3-128 (HashPage); the index keeps its first 12 bytes
// (96 bits) as the key and the block number as the value:
//
//	entry = {k0 uint64 (hash bytes 0..7), k1 uint32 (bytes 8..11), block+1 uint32}  16 bytes
//
// Entries live in one flat array, an ordered linear-probing table (no Go map,
// no pointers): home slot = k0*n>>64, entries kept sorted by key, built to a
// load factor of 0.85 (between 0.6 and 0.85 after growth). Memory is
// 16/0.85 ≈ 19 bytes per distinct non-zero block, at most ≈ 27 bytes at the
// lower load: ≈ 4.9 MB per GiB of disk, 471 MiB for a 100 GiB disk of
// distinct blocks; zero blocks and repeated contents cost nothing. The first
// table of a build is sized from the allocated blocks (an upper bound), so
// builds do not grow it; it is compacted once at the end when the disk held
// many zero or repeated blocks. A 4-byte block number bounds a disk to
// 16 TiB.
//
// Why 96 bits: a false positive needs a 96-bit collision with one of the
// disk's N blocks, probability about N/2^96 per page (3e-22 for a 100 GiB
// disk). Even then nothing breaks: the source sends a reference, the
// destination reads the block, finds that its full 128-bit hash differs
// (ErrStale) and fetches the page from the source. The full page hash always
// travels in the Ref, so the check is done on all 128 bits.
//
// Building reads the disk in 1 MiB sequential chunks with pread from
// Options.Workers goroutines (holes of sparse files are skipped with
// SEEK_DATA/SEEK_HOLE), hashes in parallel and inserts from one goroutine.
// For equal blocks the lowest offset wins, so the result does not depend on
// scheduling. Options.Progress is called a few times per second.
//
// Indexes persist in Options.StateDir (format in persist.go), keyed by the
// disk's identity: device, inode, size and mtime in ns (for block devices:
// st_rdev and the size from seeking to the end). Open reuses a persisted
// index only if all of them match and its checksum is good, else rebuilds.
//
// Refresh is incremental when the change can be told: an unchanged identity
// means nothing to do; regions reported with Invalidate (1 MiB granularity)
// and growth are re-hashed on top of a copy of the table without them.
// Otherwise it rebuilds the whole index at Options.ReadBytesPerSec. In both
// cases the new table is swapped in atomically: Lookup never takes a lock.
// A block device's mtime does not move on writes, so a block device without
// Invalidate reports is always rebuilt.
//
// A Catalog holds the indexes of one domain's disks; disk number =
// position. Classify hashes a page once and returns zero / disk reference /
// full, plus the hash for the manifest. When the destination falls back on a
// reference, Catalog.MarkStale(hash) stops that block from being offered
// again (one bit per block, allocated on first use) and queues its region
// for the next Refresh.
//
// # Destination side: Resolver
//
// A Resolver opens the domain's disks as configured on the destination host,
// in the same order. ResolveBatch bounds-checks every Ref (known disk,
// aligned offset, block inside the disk: else ErrOutOfBounds, a protocol
// error), sorts the rest by disk and offset, coalesces adjacent blocks into
// reads of up to 256 KiB, runs at most `workers` reads at once, verifies each
// block against the page's 128-bit hash and copies it out. A changed block
// (ErrStale) or a missing or unreadable disk (ErrDiskUnavailable) is reported
// per ref so the caller fetches that page from the source instead. The index
// being stale can therefore only cost a fallback fetch, never correctness.
package dedup
