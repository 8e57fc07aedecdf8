package main

import (
	"bytes"
	"testing"
)

func TestWrongPages(t *testing.T) {
	const pages, hotStart, hotPages = 8, 4, 2
	orig := make([]byte, pages*pageSize)
	for i := range orig {
		orig[i] = byte(i*7 + i>>12)
	}
	cases := []struct {
		name   string
		change func(m []byte)
		want   int
	}{
		{"an identical copy has no wrong page", func([]byte) {}, 0},
		{"a flipped byte in a cold page is wrong", func(m []byte) { m[1*pageSize+100] ^= 1 }, 1},
		{"a guest stamp in a hot page is not wrong", func(m []byte) {
			copy(m[hotStart*pageSize+3*stampSlot:], bytes.Repeat([]byte{0xee}, stampBytes))
		}, 0},
		{"a flipped byte in the never-stamped tail of a hot slot is wrong", func(m []byte) {
			m[(hotStart+1)*pageSize+5*stampSlot+stampBytes+3] ^= 1
		}, 1},
		{"a page missing after a post-copy reads as zeros and is wrong", func(m []byte) {
			clear(m[7*pageSize : 8*pageSize])
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
	if n, _ := wrongPages(orig, orig[:pageSize], hotStart, hotPages); n != pages {
		t.Fatalf("a copy of another size: %d wrong pages, want all %d", n, pages)
	}
}
