package xenmem

import "math/bits"

// Bitmap is a fixed-size set of pfns, one bit per page.
type Bitmap struct {
	n     uint64
	words []uint64
}

// NewBitmap returns an empty bitmap for n pages.
func NewBitmap(n uint64) *Bitmap { return &Bitmap{n: n, words: make([]uint64, (n+63)/64)} }

// Len is the number of pages the bitmap covers.
func (b *Bitmap) Len() uint64 { return b.n }

// Words exposes the backing words (bit i of word w is pfn w*64+i).
func (b *Bitmap) Words() []uint64 { return b.words }

func (b *Bitmap) Set(i uint64)       { b.words[i>>6] |= 1 << (i & 63) }
func (b *Bitmap) Clear(i uint64)     { b.words[i>>6] &^= 1 << (i & 63) }
func (b *Bitmap) Test(i uint64) bool { return b.words[i>>6]&(1<<(i&63)) != 0 }

// Has is Test for an i that may lie past Len() (false there).
func (b *Bitmap) Has(i uint64) bool { return i < b.n && b.Test(i) }

// Grow makes the bitmap cover at least n pages; the new ones are clear.
// The zero Bitmap is an empty one, ready to grow.
func (b *Bitmap) Grow(n uint64) {
	if n <= b.n {
		return
	}
	if need := int((n + 63) / 64); need > len(b.words) {
		b.words = append(b.words, make([]uint64, need-len(b.words))...)
	}
	b.n = n
}

// SetAll marks every page.
func (b *Bitmap) SetAll() {
	for i := range b.words {
		b.words[i] = ^uint64(0)
	}
	b.trim()
}

// Reset clears every page.
func (b *Bitmap) Reset() { clear(b.words) }

// Count is the number of pages set.
func (b *Bitmap) Count() uint64 {
	var c int
	for _, w := range b.words {
		c += bits.OnesCount64(w)
	}
	return uint64(c)
}

// Or sets every page set in o (same length).
func (b *Bitmap) Or(o *Bitmap) {
	for i, w := range o.words {
		b.words[i] |= w
	}
}

// AndNot clears every page set in o (same length).
func (b *Bitmap) AndNot(o *Bitmap) {
	for i, w := range o.words {
		b.words[i] &^= w
	}
}

// CopyFrom makes b equal to o (same length).
func (b *Bitmap) CopyFrom(o *Bitmap) { copy(b.words, o.words) }

// Next returns the first set pfn >= i, or Len() if none.
func (b *Bitmap) Next(i uint64) uint64 {
	if i >= b.n {
		return b.n
	}
	w := i >> 6
	cur := b.words[w] >> (i & 63)
	if cur != 0 {
		return i + uint64(bits.TrailingZeros64(cur))
	}
	for w++; w < uint64(len(b.words)); w++ {
		if b.words[w] != 0 {
			return w<<6 + uint64(bits.TrailingZeros64(b.words[w]))
		}
	}
	return b.n
}

func (b *Bitmap) trim() {
	if r := b.n & 63; r != 0 {
		b.words[len(b.words)-1] &= (1 << r) - 1
	}
}
