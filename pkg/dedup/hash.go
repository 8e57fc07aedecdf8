package dedup

import (
	"bytes"

	"github.com/zeebo/xxh3"
)

// BlockSize is the page and disk block size the index works in: guest pages
// are compared with 4 KiB blocks at 4 KiB-aligned disk offsets.
const BlockSize = 4096

// Hash is the 128-bit content hash of one page: xxh3-128, big-endian Hi||Lo
// (the canonical xxh3 byte order).
type Hash [16]byte

// zeroPage is a page of zeros, compared against by IsZero.
var zeroPage [BlockSize]byte

// zeroHash is HashPage of a zero page, returned by Classify for zero pages so
// the manifest never has to hash one.
var zeroHash = HashPage(zeroPage[:])

// ZeroHash returns the hash of a zero page of BlockSize bytes.
func ZeroHash() Hash { return zeroHash }

// HashPage returns the xxh3-128 hash of p (any length; normally BlockSize).
func HashPage(p []byte) Hash {
	return xxh3.Hash128(p).Bytes()
}

// IsZero reports whether every byte of p is zero. It compares against a
// static zero page with bytes.Equal (vectorised memequal) and stops at the
// first differing chunk, so non-zero pages are rejected in a few nanoseconds.
func IsZero(p []byte) bool {
	for len(p) > BlockSize {
		if !bytes.Equal(p[:BlockSize], zeroPage[:]) {
			return false
		}
		p = p[BlockSize:]
	}
	return bytes.Equal(p, zeroPage[:len(p)])
}

// key is the part of a Hash the index stores: its first 12 bytes.
type key struct {
	k0 uint64 // hash bytes 0..7 (xxh3 Hi)
	k1 uint32 // hash bytes 8..11 (top half of xxh3 Lo)
}

func keyOf(h *Hash) key {
	return key{
		k0: uint64(h[0])<<56 | uint64(h[1])<<48 | uint64(h[2])<<40 | uint64(h[3])<<32 |
			uint64(h[4])<<24 | uint64(h[5])<<16 | uint64(h[6])<<8 | uint64(h[7]),
		k1: uint32(h[8])<<24 | uint32(h[9])<<16 | uint32(h[10])<<8 | uint32(h[11]),
	}
}

// hashKey hashes one block straight to its key (skips the byte round trip).
func hashKey(p []byte) key {
	u := xxh3.Hash128(p)
	return key{k0: u.Hi, k1: uint32(u.Lo >> 32)}
}
