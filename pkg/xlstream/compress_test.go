package xlstream

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// encodeCompressed encodes in as Encode does, with compression on a link
// of linkRate bytes/s (always: SetAlways); wait, when set, is what each
// token's input is said to have made the encoder wait.
func encodeCompressed(t *testing.T, in []byte, idx PageIndex, linkRate int64, wait time.Duration, always bool) ([]byte, EncodeStats) {
	t.Helper()
	var frames bytes.Buffer
	e := NewEncoder(&frames, idx, 0)
	if err := e.EnableCompression(linkRate, always); err != nil {
		t.Fatal(err)
	}
	if wait > 0 {
		rd := NewReader(bytes.NewReader(in))
		for {
			tok, err := rd.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			e.noteWait(wait)
			if err := e.WriteToken(tok); err != nil {
				t.Fatal(err)
			}
			e.mu.Lock()
			e.acked = e.nextSeq
			e.mu.Unlock()
		}
		if err := e.End(); err != nil {
			t.Fatal(err)
		}
		e.Close()
		return frames.Bytes(), e.Stats()
	}
	st, _, err := encode(bytes.NewReader(in), e)
	if err != nil {
		t.Fatal(err)
	}
	return frames.Bytes(), st
}

func TestCompressedRecordsRebuildTheStreamByteForByte(t *testing.T) {
	for _, fx := range fixtures {
		t.Run(fx.file, func(t *testing.T) {
			in := loadFixture(t, fx.file)
			d := newTestDisk(t, in, 3)
			var plain bytes.Buffer
			pst, _, err := Encode(bytes.NewReader(in), &plain, d)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				name   string
				link   int64
				wait   time.Duration
				always bool
			}{
				// A 10 MB/s link: compressing pays for itself.
				{"slow link", 10e6, 0, false},
				// A measured link that never blocks, but an input
				// that makes the encoder wait 1 s for each token (a
				// record holds up to 4 MiB: a few MB/s, as xl under
				// emulation): the wait pays for it.
				{"slow producer", 0, time.Second, false},
				// Neither, but bytes are asked to matter more.
				{"always", 0, 0, true},
			} {
				t.Run(c.name, func(t *testing.T) {
					frames, st := encodeCompressed(t, in, d, c.link, c.wait, c.always)
					var out bytes.Buffer
					dst, err := Decode(bytes.NewReader(frames), &out, d)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(out.Bytes(), in) {
						t.Fatalf("rebuilt %d bytes, original %d (or different)", out.Len(), len(in))
					}
					if st.CompressedRecords == 0 || dst.CompressedRecords != st.CompressedRecords {
						t.Fatalf("compressed records: source %d, destination %d", st.CompressedRecords, dst.CompressedRecords)
					}
					if 2*st.OutBytes >= pst.OutBytes || int64(len(frames)) != st.OutBytes {
						t.Fatalf("link bytes %d compressed (%d written), %d plain", st.OutBytes, len(frames), pst.OutBytes)
					}
					t.Logf("link bytes %d → %d (%.2f); payload %d → %d; %d of %d records compressed",
						pst.OutBytes, st.OutBytes, float64(st.OutBytes)/float64(pst.OutBytes),
						st.PayloadBytes, st.PayloadSentBytes, st.CompressedRecords, st.PageRecords)
				})
			}
		})
	}
}

func TestUncompressedLinkStaysPlainWithoutAReason(t *testing.T) {
	// A link that never blocks and an input that never waits: the CPU is
	// the bottleneck, nothing is compressed beyond the first measurements
	// and probes.
	in := loadFixture(t, fixtures[0].file)
	_, st := encodeCompressed(t, in, nil, 0, 0, false)
	// Measuring takes two records per level (two levels); a probe, one in
	// 16 of the records with full pages.
	if st.CompressedRecords > 2*2+st.PageRecords/16+1 {
		t.Fatalf("%d of %d records compressed with neither a slow link nor a slow producer", st.CompressedRecords, st.PageRecords)
	}
}

func TestSessionOverTCPCompresses(t *testing.T) {
	in := loadFixture(t, fixtures[1].file)
	d := newTestDisk(t, in, 3)
	var rebuilt bytes.Buffer
	r := tcpSession(t, in, SendOptions{Compress: true, CompressLink: 10e6}, ReceiveOptions{}, d, func(cmdIn io.Reader, cmdOut io.WriteCloser) {
		io.Copy(&rebuilt, cmdIn)
		cmdOut.Write([]byte("ready"))
		cmdOut.Close()
	})
	st, recvStats := r.send, r.recv
	if !bytes.Equal(rebuilt.Bytes(), in) || r.back != "ready" || st.ExitStatus != 0 {
		t.Fatalf("rebuilt %d bytes of %d (equal: %v), relayed %q, exit %d", rebuilt.Len(), len(in), bytes.Equal(rebuilt.Bytes(), in), r.back, st.ExitStatus)
	}
	if st.Encode.CompressedRecords == 0 || recvStats.CompressedRecords != st.Encode.CompressedRecords {
		t.Fatalf("compressed records: source %d, destination %d", st.Encode.CompressedRecords, recvStats.CompressedRecords)
	}
	t.Logf("stream %d bytes, link %d", len(in), st.Encode.OutBytes)
}

func TestDecodeRejectsCorruptCompressedFrames(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	frames, _ := encodeCompressed(t, in, nil, 10e6, 0, false)
	// The first compressed frame, and where its payload starts.
	var at, n int = -1, 0
	for o := 0; o < len(frames); {
		m := int(le.Uint32(frames[o+1:]))
		if frames[o] == FramePagesZ {
			at, n = o, m
			break
		}
		o += frameHeaderLen + m
	}
	if at < 0 {
		t.Fatal("no compressed PAGES frame")
	}
	body := frames[at+frameHeaderLen : at+frameHeaderLen+n]
	zstart := bytes.Index(body, []byte{0x28, 0xb5, 0x2f, 0xfd}) // zstd magic
	if zstart < 0 {
		t.Fatal("no zstd frame in the compressed PAGES frame")
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	replace := func(z []byte) []byte {
		var b bytes.Buffer
		b.Write(frames[:at])
		writeFrame(&b, FramePagesZ, body[:zstart], z)
		b.Write(frames[at+frameHeaderLen+n:])
		return b.Bytes()
	}
	for name, c := range map[string][]byte{
		"garbage":         replace([]byte("not a zstd frame at all")),
		"cut short":       replace(body[zstart : zstart+(len(body)-zstart)/2]),
		"one byte short":  replace(enc.EncodeAll(make([]byte, 100), nil)),
		"16 MiB of zeros": replace(enc.EncodeAll(make([]byte, 16<<20), nil)),
		"flipped bit": func() []byte {
			c := bytes.Clone(frames)
			c[at+frameHeaderLen+zstart+len(body[zstart:])/2] ^= 0x10
			return c
		}(),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Decode(bytes.NewReader(c), io.Discard, nil)
			if err == nil {
				t.Fatal("decoded without error")
			}
			if !errors.Is(err, ErrBadFrame) && !errors.Is(err, ErrChecksum) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
		})
	}
}
