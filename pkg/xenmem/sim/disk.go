package sim

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// GenerateDisk writes a raw disk image of size bytes filled with random
// content derived from seed, streamed in 1 MiB chunks. It is idempotent: an
// existing file of that size is left alone (whatever its content); one of
// another size is an error. The image is written to a temporary file and
// renamed into place, so an interrupted run leaves no partial image.
func GenerateDisk(path string, size int64, seed int64) error {
	if size <= 0 || size%4096 != 0 {
		return fmt.Errorf("generate disk %s: size %d must be a positive multiple of 4096", path, size)
	}
	if st, err := os.Stat(path); err == nil {
		if st.Size() != size {
			return fmt.Errorf("generate disk %s: exists with size %d, want %d (remove it to regenerate)", path, st.Size(), size)
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("generate disk %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("generate disk %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())              // no-op after the rename
	rng := uint64(seed) ^ 0x6469736b2d696d67 // "disk-img"
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		chunk := buf[:min(int64(len(buf)), size-off)]
		fillRandom(chunk, &rng)
		if _, err := tmp.Write(chunk); err != nil {
			tmp.Close()
			return fmt.Errorf("generate disk %s: %w", path, err)
		}
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("generate disk %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("generate disk %s: %w", path, err)
	}
	return nil
}

// fillRandom fills b (a multiple of 8 bytes) with splitmix64 output: not
// cryptographic, but every 4 KiB block is distinct and non-zero with
// overwhelming probability, and it runs at memory speed.
func fillRandom(b []byte, state *uint64) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], splitmix64(state))
	}
}
