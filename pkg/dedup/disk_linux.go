package dedup

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// identity names one disk's content generation. A persisted index is reused
// only when every field matches.
type identity struct {
	Dev     uint64 // st_dev of a file; st_rdev of a block device
	Ino     uint64
	Size    int64
	MtimeNs int64
	Block   bool // a block device: writes do not move its mtime
}

func (id identity) String() string {
	return fmt.Sprintf("dev=%#x ino=%d size=%d mtime=%d blockdev=%t", id.Dev, id.Ino, id.Size, id.MtimeNs, id.Block)
}

// statDisk returns the identity of an open disk (raw file or block device).
// A block device's size comes from seeking to its end (st_size is 0).
func statDisk(f *os.File) (identity, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return identity{}, fmt.Errorf("fstat: %w", err)
	}
	id := identity{Dev: st.Dev, Ino: st.Ino, Size: st.Size, MtimeNs: st.Mtim.Nano()}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFBLK:
		id.Block = true
		id.Dev = st.Rdev
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return identity{}, fmt.Errorf("block device size: %w", err)
		}
		id.Size = size
	default:
		return identity{}, fmt.Errorf("not a regular file or block device (mode %#o)", st.Mode)
	}
	return id, nil
}

// diskSize returns the current size of an open disk.
func diskSize(f *os.File) (int64, error) {
	return f.Seek(0, io.SeekEnd)
}

// nextData returns the start and end of the next data extent at or after
// off, skipping holes of sparse files (holes read as zeros and are never
// indexed). Filesystems or devices without SEEK_DATA report everything as
// data.
func nextData(f *os.File, off, size int64) (start, end int64) {
	fd := int(f.Fd())
	s, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			return size, size // only a hole up to the end
		}
		return off, size
	}
	e, err := unix.Seek(fd, s, unix.SEEK_HOLE)
	if err != nil || e > size {
		e = size
	}
	return s, e
}

// allocatedBlocks estimates how many blocks of the disk hold data: st_blocks
// for a (possibly sparse) file, every block for a block device. It sizes the
// first table of a build; the table grows or shrinks from there.
func allocatedBlocks(f *os.File, id identity) int64 {
	blocks := id.Size / BlockSize
	if id.Block {
		return blocks
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return blocks
	}
	return min(blocks, st.Blocks*512/BlockSize)
}

// adviseSequential tells the kernel the disk is about to be read front to
// back (larger readahead on real devices). Advice only: errors are ignored.
func adviseSequential(f *os.File) {
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
}
