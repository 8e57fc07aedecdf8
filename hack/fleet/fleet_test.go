package main

import (
	"math/rand/v2"
	"testing"
)

// The fingerprint must see any change outside the hot set and any change
// to the never-written tail of a hot page's slots, and nothing else.
func TestFingerprintWrongPages(t *testing.T) {
	const pages = 64
	mem := make([]byte, pages*pageSize)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range mem {
		mem[i] = byte(r.Uint32())
	}
	c := ctlView{memBytes: uint64(len(mem)), hotStart: 8, hotPages: 4}
	fp := takeFingerprint(mem, c)
	cases := []struct {
		name  string
		edit  func(m []byte)
		wrong int
	}{
		{"unchanged", func([]byte) {}, 0},
		{"a guest stamp in a hot page", func(m []byte) { m[9*pageSize+64] ^= 0xff }, 0},
		{"the tail of a hot page's slot", func(m []byte) { m[9*pageSize+64+stampBytes] ^= 1 }, 1},
		{"a byte of a cold page", func(m []byte) { m[30*pageSize+4095] ^= 1 }, 1},
		{"two cold pages and a hot tail", func(m []byte) { m[0] ^= 1; m[63*pageSize] ^= 1; m[11*pageSize+127] ^= 1 }, 3},
	}
	for _, tc := range cases {
		m := append([]byte(nil), mem...)
		tc.edit(m)
		if n, _ := fp.wrongPages(m, c); n != tc.wrong {
			t.Errorf("%s: %d wrong pages, want %d", tc.name, n, tc.wrong)
		}
	}
	if n, _ := fp.wrongPages(mem[:len(mem)-pageSize], c); n != pages {
		t.Errorf("a shorter memory: %d wrong pages, want every page (%d)", n, pages)
	}
	moved := c
	moved.hotStart++
	if n, _ := fp.wrongPages(mem, moved); n != pages {
		t.Errorf("a moved hot set: %d wrong pages, want every page (%d)", n, pages)
	}
}

// Hosts keep the defaults' 512 MiB until the most crowded one would be
// over three quarters full.
func TestHostMemory(t *testing.T) {
	for _, tc := range []struct{ hosts, doms, want int }{{4, 12, 512}, {4, 16, 704}, {5, 15, 640}, {6, 30, 1280}} {
		hs, ds := hostNames(tc.hosts), domainNames(tc.doms)
		got := 0
		for _, sc := range scenarios {
			got = max(got, hostMemory(sc.placement(hs, ds)))
		}
		if got != tc.want {
			t.Errorf("%d hosts, %d domains: %d MiB, want %d", tc.hosts, tc.doms, got, tc.want)
		}
	}
}
