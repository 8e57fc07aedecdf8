package main

import (
	"bytes"
	"testing"

	"github.com/xenferry/xenferry/hack/internal/labkit"
)

func TestWrongPages(t *testing.T) {
	const pages, hotStart, hotPages = 8, 4, 2
	orig := make([]byte, pages*labkit.PageSize)
	for i := range orig {
		orig[i] = byte(i*7 + i>>12)
	}
	cases := []struct {
		name   string
		change func(m []byte)
		want   int
	}{
		{"an identical copy has no wrong page", func([]byte) {}, 0},
		{"a flipped byte in a cold page is wrong", func(m []byte) { m[1*labkit.PageSize+100] ^= 1 }, 1},
		{"a guest stamp in a hot page is not wrong", func(m []byte) {
			copy(m[hotStart*labkit.PageSize+3*labkit.StampSlot:], bytes.Repeat([]byte{0xee}, labkit.StampBytes))
		}, 0},
		{"a flipped byte in the never-stamped tail of a hot slot is wrong", func(m []byte) {
			m[(hotStart+1)*labkit.PageSize+5*labkit.StampSlot+labkit.StampBytes+3] ^= 1
		}, 1},
		{"a page missing after a post-copy reads as zeros and is wrong", func(m []byte) {
			clear(m[7*labkit.PageSize : 8*labkit.PageSize])
		}, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			now := bytes.Clone(orig)
			c.change(now)
			if n, first := wrongPages(orig, now, hotStart, hotPages); n != c.want {
				t.Fatalf("wrongPages = %d (first %v), want %d", n, first, c.want)
			}
		})
	}
	if n, _ := wrongPages(orig, orig[:labkit.PageSize], hotStart, hotPages); n != pages {
		t.Fatalf("a copy of another size: %d wrong pages, want all %d", n, pages)
	}
}
