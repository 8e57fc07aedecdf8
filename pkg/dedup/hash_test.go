package dedup

import (
	"encoding/binary"
	"testing"

	"github.com/zeebo/xxh3"
)

func TestHashPageIsXXH3BigEndian(t *testing.T) {
	p := []byte("xenferry dedup page")
	u := xxh3.Hash128(p)
	h := HashPage(p)
	if binary.BigEndian.Uint64(h[:8]) != u.Hi || binary.BigEndian.Uint64(h[8:]) != u.Lo {
		t.Fatalf("HashPage = %x, want Hi %x Lo %x", h, u.Hi, u.Lo)
	}
	k := keyOf(&h)
	if k != hashKey(p) {
		t.Fatalf("keyOf(HashPage) = %+v, hashKey = %+v", k, hashKey(p))
	}
	if ZeroHash() != HashPage(make([]byte, BlockSize)) {
		t.Fatalf("ZeroHash is not the hash of a zero page")
	}
}

func TestIsZero(t *testing.T) {
	for _, tc := range []struct {
		name string
		page func() []byte
		want bool
	}{
		{"a zero page is zero", func() []byte { return make([]byte, BlockSize) }, true},
		{"an empty slice is zero", func() []byte { return nil }, true},
		{"a page with its last byte set is not zero", func() []byte { p := make([]byte, BlockSize); p[BlockSize-1] = 1; return p }, false},
		{"a page with its first byte set is not zero", func() []byte { p := make([]byte, BlockSize); p[0] = 0x80; return p }, false},
		{"a short zero slice is zero", func() []byte { return make([]byte, 100) }, true},
		{"two zero pages are zero", func() []byte { return make([]byte, 2*BlockSize) }, true},
		{"two pages with a byte set in the second are not zero", func() []byte { p := make([]byte, 2*BlockSize+5); p[BlockSize+7] = 1; return p }, false},
		{"a byte set in the tail past whole pages is not zero", func() []byte { p := make([]byte, 2*BlockSize+5); p[2*BlockSize+4] = 1; return p }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsZero(tc.page()); got != tc.want {
				t.Fatalf("IsZero = %v, want %v", got, tc.want)
			}
		})
	}
}
