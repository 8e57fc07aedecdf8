package wire

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
)

var batchSizes = []int{64, 256, MaxBatchPages}

func benchBatch(n int) (pfns []uint64, data []byte) {
	rng := rand.New(rand.NewPCG(5, 6))
	pfns = make([]uint64, n)
	for i := range pfns {
		pfns[i] = uint64(i) * 3
	}
	return pfns, randBytes(rng, n*PageSize)
}

// BenchmarkWritePages encodes PAGES records (prefix + CRC-32C over the
// page data) into io.Discard. Reported MB/s counts page data.
func BenchmarkWritePages(b *testing.B) {
	for _, n := range batchSizes {
		b.Run(fmt.Sprintf("pages=%d", n), func(b *testing.B) {
			pfns, data := benchBatch(n)
			w := NewWriter(io.Discard)
			prefix := make([]byte, 0, 8+8*n)
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				prefix = PagesPrefix(prefix[:0], pfns, 0)
				if err := w.Write(TypePages, prefix, data); err != nil {
					b.Fatal(err)
				}
			}
			if err := w.Flush(); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkReadPages decodes PAGES records from memory: framing, CRC-32C
// check and ParsePages. Reported MB/s counts page data.
func BenchmarkReadPages(b *testing.B) {
	for _, n := range batchSizes {
		b.Run(fmt.Sprintf("pages=%d", n), func(b *testing.B) {
			pfns, data := benchBatch(n)
			var buf bytes.Buffer
			w := NewWriter(&buf)
			_ = w.WriteStreamHeader()
			for range max(1, 32*MaxBatchPages/n) { // ~128 MiB of pages
				_ = w.Write(TypePages, PagesPrefix(nil, pfns, 0), data)
			}
			_ = w.Flush()
			stream := buf.Bytes()
			src := bytes.NewReader(stream)
			r := NewReader(src)
			if err := r.ReadStreamHeader(); err != nil {
				b.Fatal(err)
			}
			out := make([]uint64, 0, n)
			// Grow the body buffer once, outside the measured loop.
			if _, err := r.Next(); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				rec, err := r.Next()
				if err == io.EOF {
					src.Reset(stream)
					r.Reset(src)
					_ = r.ReadStreamHeader()
					rec, err = r.Next()
				}
				if err != nil {
					b.Fatal(err)
				}
				var d []byte
				out, _, d, err = ParsePages(rec.Body, out)
				if err != nil || len(d) != len(data) {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkLoopbackPages streams 1 MiB PAGES records over one TCP
// connection on loopback, Writer to Reader (writev for the page data, CRC on
// both sides): the ceiling one engine stream can reach.
func BenchmarkLoopbackPages(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	const n = 256
	pfns, data := benchBatch(n)
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		r := NewReader(c)
		if err := r.ReadStreamHeader(); err != nil {
			done <- err
			return
		}
		out := make([]uint64, 0, n)
		for {
			rec, err := r.Next()
			if err != nil {
				done <- err
				return
			}
			if rec.Type == TypeEnd {
				done <- nil
				return
			}
			if out, _, _, err = ParsePages(rec.Body, out); err != nil {
				done <- err
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	w := NewWriter(c)
	if err := w.WriteStreamHeader(); err != nil {
		b.Fatal(err)
	}
	prefix := make([]byte, 0, 8+8*n)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		prefix = PagesPrefix(prefix[:0], pfns, 0)
		if err := w.Write(TypePages, prefix, data); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Write(TypeEnd); err != nil {
		b.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

// BenchmarkWriteSmallRecords encodes ZERO_PAGES records of 64 pfns: the
// buffered path for small records.
func BenchmarkWriteSmallRecords(b *testing.B) {
	pfns, _ := benchBatch(64)
	w := NewWriter(io.Discard)
	body := make([]byte, 0, 8+8*64)
	b.ReportAllocs()
	for b.Loop() {
		body = MarshalPFNs(body[:0], pfns)
		if err := w.Write(TypeZeroPages, body); err != nil {
			b.Fatal(err)
		}
	}
}
