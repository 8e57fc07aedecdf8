package xenmem

import "testing"

func TestBitmapGrowsFromZero(t *testing.T) {
	var b Bitmap
	if b.Has(0) || b.Has(1<<20) || b.Len() != 0 {
		t.Fatal("the zero Bitmap is not empty")
	}
	b.Grow(70)
	b.Set(69)
	b.Grow(10) // never shrinks
	b.Grow(200)
	if b.Len() != 200 || !b.Has(69) || b.Has(68) || b.Has(199) || b.Has(200) || b.Has(1<<40) {
		t.Fatalf("after growth: len %d, 69 %v, 68 %v", b.Len(), b.Has(69), b.Has(68))
	}
	b.Set(199)
	if b.Next(0) != 69 || b.Next(70) != 199 || b.Next(200) != 200 || b.Count() != 2 {
		t.Fatalf("Next/Count after growth: %d %d %d %d", b.Next(0), b.Next(70), b.Next(200), b.Count())
	}
}
