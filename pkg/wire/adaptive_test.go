package wire

import (
	"bytes"
	"math/rand"
	"os"
	"testing"
)

func TestCompressorChoosesByContent(t *testing.T) {
	const batch = 256 * PageSize
	line := []byte("kernel: the quick brown fox jumps over the lazy dog 0123456789\n")
	text := bytes.Repeat(line, batch/len(line)+1)[:batch]
	random := make([]byte, batch)
	rand.New(rand.NewSource(1)).Read(random)
	dec, err := NewPagesDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	for _, c := range []struct {
		name        string
		data        []byte
		link        int64
		idle        float64 // seconds the sender waits per input byte
		always      bool
		wantMostlyZ bool
	}{
		{"text on 1 Gbit/s compresses", text, 125e6, 0, false, true},
		{"random data on 1 Gbit/s goes raw", random, 125e6, 0, false, false},
		{"text on an unlimited link goes raw", text, 0, 0, false, false},
		// A producer at 1 MB/s leaves the sender idle 1 µs per byte:
		// compression fits in an eighth of that (it runs at > 8 MB/s).
		{"text from a slow producer compresses on an unlimited link", text, 0, 1e-6, false, true},
		{"random data from a slow producer goes raw", random, 0, 1e-6, false, false},
		// A producer at 100 GB/s leaves no time to spare.
		{"text from a fast producer on an unlimited link goes raw", text, 0, 1e-11, false, false},
		// Always: bytes matter more than time, whatever the link.
		{"text always compresses on an unlimited link", text, 0, 0, true, true},
		{"text always compresses on a fast link", text, 100e9, 0, true, true},
		{"random data goes raw even always", random, 0, 0, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cp, err := NewCompressor(c.link)
			if err != nil {
				t.Fatal(err)
			}
			defer cp.Close()
			cp.SetIdle(c.idle)
			cp.SetAlways(c.always)
			var buf, out []byte
			z := 0
			for range 64 {
				var ok bool
				out, ok = cp.Compress(buf, c.data)
				if ok {
					z++
					buf = out
					got, err := DecodePages(dec, out, batch/PageSize, nil)
					if err != nil || !bytes.Equal(got, c.data) {
						t.Fatalf("round trip: %v", err)
					}
				} else if &out[0] != &c.data[0] {
					t.Fatal("raw answer is not the data itself")
				}
			}
			st := cp.Stats()
			if (z > 32) != c.wantMostlyZ {
				t.Fatalf("%d of 64 batches compressed (%+v)", z, st)
			}
			t.Logf("%d/64 compressed, stats %+v", z, st)
		})
	}
}

// BenchmarkCompressorSample runs the compressor over a file of memory (a
// guest RAM dump: XENFERRY_COMPRESS_SAMPLE=hack/guestimage/.work/mem.raw)
// in 256-page batches, on a 1 Gbit/s link, and reports the bytes sent
// over the bytes offered.
func BenchmarkCompressorSample(b *testing.B) {
	path := os.Getenv("XENFERRY_COMPRESS_SAMPLE")
	if path == "" {
		b.Skip("set XENFERRY_COMPRESS_SAMPLE to a memory dump")
	}
	mem, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	const batch = 256 * PageSize
	mem = mem[:len(mem)/batch*batch]
	b.SetBytes(int64(len(mem)))
	var st CompressorStats
	for range b.N {
		cp, err := NewCompressor(125e6)
		if err != nil {
			b.Fatal(err)
		}
		var buf []byte
		for off := 0; off < len(mem); off += batch {
			out, ok := cp.Compress(buf, mem[off:off+batch])
			if ok {
				buf = out
			}
		}
		st = cp.Stats()
		cp.Close()
	}
	b.ReportMetric(float64(st.SentBytes)/float64(st.RawBytes), "sent/raw")
	b.ReportMetric(float64(st.Compressed)/float64(st.Batches), "compressed/batch")
}
