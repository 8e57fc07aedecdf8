package xlstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/xxh3"
)

// fixtures are streams captured in the lab with `xl save` (hack/xenlab),
// trimmed by hack/xenlab/fixtures: every record is verbatim from the
// capture, only some PAGE_DATA records were left out.
var fixtures = []struct {
	name       string
	file       string
	domainType uint32
	domName    string
}{
	{"PV domU, Linux 6.1", "testdata/pv.xl.zst", DomainX86PV, "fixpv"},
	{"PVH domU (saved as x86 HVM), Linux 6.1", "testdata/pvh.xl.zst", DomainX86HVM, "fixpvh"},
}

func loadFixture(t testing.TB, file string) []byte {
	t.Helper()
	z, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("read fixture: %v", err)
	}
	d, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	b, err := d.DecodeAll(z, nil)
	if err != nil {
		t.Fatalf("decompress %s: %v", file, err)
	}
	return b
}

// captures also runs the tests on full captures when XENLAB_CAPTURES names
// a directory of *.xl files (hack/xenlab/.work/share/cap after a lab run).
func allStreams(t *testing.T) map[string][]byte {
	m := map[string][]byte{}
	for _, f := range fixtures {
		m[f.name] = loadFixture(t, f.file)
	}
	if dir := os.Getenv("XENLAB_CAPTURES"); dir != "" {
		files, _ := filepath.Glob(filepath.Join(dir, "*.xl"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			m["capture "+filepath.Base(f)] = b
		}
	}
	return m
}

func TestReaderParsesCapturedStreamsAndPassesEveryByteThrough(t *testing.T) {
	for _, f := range fixtures {
		t.Run(f.name, func(t *testing.T) {
			in := loadFixture(t, f.file)
			r := NewReader(bytes.NewReader(in))
			var out bytes.Buffer
			layers := map[Layer]int{}
			for {
				tok, err := r.Next()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("Next: %v", err)
				}
				layers[tok.Layer]++
				if tok.Kind == TokPages {
					p := tok.Page
					if len(p.Raw) != p.PrefixLen()+p.NData*PageSize {
						t.Fatalf("page record of %d bytes for %d pfns, %d pages", len(p.Raw), len(p.Entries), p.NData)
					}
				}
				out.Write(tok.Raw)
			}
			if !bytes.Equal(out.Bytes(), in) {
				t.Fatalf("tokens give %d bytes, stream has %d (or differ)", out.Len(), len(in))
			}
			if !r.Complete() {
				t.Fatal("stream not complete after EOF")
			}
			if h := r.Libxc(); h == nil || h.DomainType != f.domainType || h.XenMajor != 4 || h.XenMinor != 17 {
				t.Fatalf("libxc header %+v, want type %d from Xen 4.17", h, f.domainType)
			}
			if x := r.XL(); x == nil || !strings.Contains(string(x.Config), `"name": "`+f.domName+`"`) {
				t.Fatalf("xl header config does not name %q", f.domName)
			}
			s := r.Stats()
			if s.PageRecords == 0 || s.DataPages == 0 || s.Bytes != int64(len(in)) {
				t.Fatalf("stats %+v", s)
			}
			if layers[LayerXL] == 0 || layers[LayerLibxl] == 0 || layers[LayerLibxc] == 0 {
				t.Fatalf("layers seen %v", layers)
			}
		})
	}
}

// testDisk is a shared disk for tests: a real file plus an index of its
// pages (sorted by hash; no maps for per-page state).
type testDisk struct {
	f       *os.File
	hashes  [][16]byte
	offsets []uint64
	reads   int
}

func hashPage(p []byte) [16]byte { return xxh3.Hash128(p).Bytes() }

// newTestDisk writes every step-th distinct non-zero page of stream to a
// file (at shuffled offsets) and indexes it.
func newTestDisk(t *testing.T, stream []byte, step int) *testDisk {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	d := &testDisk{f: f}
	r := NewReader(bytes.NewReader(stream))
	var pages [][]byte
	n := 0
	for {
		tok, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if tok.Kind != TokPages {
			continue
		}
		for i := 0; i < tok.Page.NData; i++ {
			if pg := tok.Page.Data(i); !isZero(pg) {
				if n%step == 0 {
					pages = append(pages, bytes.Clone(pg))
				}
				n++
			}
		}
	}
	type ent struct {
		h   [16]byte
		off uint64
	}
	var ents []ent
	for i, pg := range pages {
		off := uint64((i*7919)%len(pages)) * PageSize // a permutation: 7919 is prime
		if _, err := f.WriteAt(pg, int64(off)); err != nil {
			t.Fatal(err)
		}
		ents = append(ents, ent{hashPage(pg), off})
	}
	sort.Slice(ents, func(i, j int) bool { return bytes.Compare(ents[i].h[:], ents[j].h[:]) < 0 })
	for _, e := range ents {
		d.hashes, d.offsets = append(d.hashes, e.h), append(d.offsets, e.off)
	}
	return d
}

func (d *testDisk) Lookup(page []byte) (Ref, bool) {
	h := hashPage(page)
	i := sort.Search(len(d.hashes), func(i int) bool { return bytes.Compare(d.hashes[i][:], h[:]) >= 0 })
	if i < len(d.hashes) && d.hashes[i] == h {
		return Ref{Disk: 0, Offset: d.offsets[i], Hash: h}, true
	}
	return Ref{}, false
}

func (d *testDisk) ReadPage(ref Ref, dst []byte) error {
	d.reads++
	if ref.Disk != 0 {
		return fmt.Errorf("unknown disk %d", ref.Disk)
	}
	if _, err := d.f.ReadAt(dst, int64(ref.Offset)); err != nil {
		return err
	}
	if hashPage(dst) != ref.Hash {
		return errors.New("stale block")
	}
	return nil
}

func TestEncodeDecodeRebuildsCapturedStreamsByteForByte(t *testing.T) {
	for name, in := range allStreams(t) {
		for _, withDisk := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/disk=%v", name, withDisk), func(t *testing.T) {
				var idx PageIndex
				var res PageResolver
				if withDisk {
					d := newTestDisk(t, in, 2)
					idx, res = d, d
				}
				var frames, out bytes.Buffer
				es, rs, err := Encode(bytes.NewReader(in), &frames, idx)
				if err != nil {
					t.Fatalf("Encode: %v", err)
				}
				ds, err := Decode(bytes.NewReader(frames.Bytes()), &out, res)
				if err != nil {
					t.Fatalf("Decode: %v", err)
				}
				if !bytes.Equal(out.Bytes(), in) {
					t.Fatalf("rebuilt stream differs: %d bytes, original %d", out.Len(), len(in))
				}
				if es.ZeroPages+es.RefPages+es.DataPages != rs.DataPages {
					t.Fatalf("encoder kinds %+v do not add up to %d pages", es, rs.DataPages)
				}
				if es.ZeroPages == 0 || ds.ZeroPages != es.ZeroPages || ds.RefPages != es.RefPages {
					t.Fatalf("encode %+v / decode %+v", es, ds)
				}
				if withDisk && es.RefPages == 0 {
					t.Fatal("no page was found on the disk")
				}
				if int64(frames.Len()) >= int64(len(in)) {
					t.Fatalf("frames (%d bytes) not smaller than the stream (%d)", frames.Len(), len(in))
				}
				t.Logf("%d bytes -> %d on the link (%.1f%%): %d zero, %d ref, %d data pages",
					len(in), frames.Len(), 100*float64(frames.Len())/float64(len(in)), es.ZeroPages, es.RefPages, es.DataPages)
			})
		}
	}
}

// A disk block that changed after the source indexed it must not end up in
// the guest: without a source to ask, the rebuild fails.
func TestDecodeRejectsStaleDiskBlockWithoutFallback(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	d := newTestDisk(t, in, 1)
	var frames bytes.Buffer
	if _, _, err := Encode(bytes.NewReader(in), &frames, d); err != nil {
		t.Fatal(err)
	}
	if _, err := d.f.WriteAt(bytes.Repeat([]byte{0xAB}, PageSize), 0); err != nil {
		t.Fatal(err)
	}
	_, err := Decode(bytes.NewReader(frames.Bytes()), io.Discard, d)
	if !errors.Is(err, ErrFallbackFailed) {
		t.Fatalf("Decode with a stale block: %v, want ErrFallbackFailed", err)
	}
}

// The destination of a session asks the source again for stale blocks and
// still rebuilds the stream byte for byte, over real TCP.
func TestSessionOverTCPFallsBackForStaleBlocks(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	d := newTestDisk(t, in, 1)
	// Make 8 blocks stale before the session starts.
	for i := 0; i < 8; i++ {
		if _, err := d.f.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, PageSize), int64(i*3)*PageSize); err != nil {
			t.Fatal(err)
		}
	}
	// The destination "command" answers with a handshake message after
	// the stream, like xl migrate-receive.
	var rebuilt bytes.Buffer
	r := tcpSession(t, in, SendOptions{}, ReceiveOptions{}, d, func(cmdIn io.Reader, cmdOut io.WriteCloser) {
		cmdOut.Write([]byte("banner\n"))
		io.Copy(&rebuilt, cmdIn)
		cmdOut.Write([]byte("ready"))
		cmdOut.Close()
	})
	st, recvStats := r.send, r.recv
	if !bytes.Equal(rebuilt.Bytes(), in) {
		t.Fatalf("rebuilt %d bytes, original %d (or different)", rebuilt.Len(), len(in))
	}
	if r.back != "banner\nready" || st.ExitStatus != 0 {
		t.Fatalf("relayed back %q, exit %d", r.back, st.ExitStatus)
	}
	if recvStats.StalePages == 0 || st.Encode.FallbackPages != recvStats.StalePages {
		t.Fatalf("stale pages: destination %d, source sent %d", recvStats.StalePages, st.Encode.FallbackPages)
	}
	t.Logf("source %+v; destination %+v", st.Encode, recvStats)
}

// session is what tcpSession saw.
type session struct {
	send SendStats
	recv DecodeStats
	back string // what the source's xl got back
}

// tcpSession runs a session on stream in over loopback TCP: Send with
// sopts at the source (res as its PageIndex when it is one), Receive with
// ropts and resolver res at the destination, where command plays xl
// migrate-receive: it reads the rebuilt stream from cmdIn and answers on
// cmdOut, which it closes. Either side's error fails the test.
func tcpSession(t *testing.T, in []byte, sopts SendOptions, ropts ReceiveOptions, res PageResolver, command func(cmdIn io.Reader, cmdOut io.WriteCloser)) session {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx := context.Background()
	if ropts.Wait == nil {
		ropts.Wait = func() int { return 0 }
	}
	var out session
	var wg sync.WaitGroup
	var recvErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			recvErr = err
			return
		}
		defer c.Close()
		cmdInR, cmdInW := io.Pipe()
		cmdOutR, cmdOutW := io.Pipe()
		go command(cmdInR, cmdOutW)
		out.recv, recvErr = Receive(ctx, c, cmdInW, cmdOutR, res, ropts)
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	idx, _ := res.(PageIndex)
	var back bytes.Buffer
	out.send, err = Send(ctx, c, bytes.NewReader(in), &back, idx, sopts)
	wg.Wait()
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if recvErr != nil {
		t.Fatalf("Receive: %v", recvErr)
	}
	out.back = back.String()
	return out
}

func TestReaderRejectsTruncatedStreams(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	cuts := []int{0, 1, 7, 8, 47, 48, 100, 900, 931, 932, 940, 1000, 5000, len(in) / 3, len(in) / 2, len(in) - 9, len(in) - 1}
	for _, n := range cuts {
		t.Run(fmt.Sprintf("cut at %d", n), func(t *testing.T) {
			err := drain(in[:n])
			if !errors.Is(err, ErrTruncated) {
				t.Fatalf("stream cut at %d: %v, want ErrTruncated", n, err)
			}
		})
	}
}

func drain(b []byte) error {
	r := NewReader(bytes.NewReader(b))
	for {
		_, err := r.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// xlOptLen is where the libxl header starts in the fixtures.
func libxlStart(t *testing.T, in []byte) int { return xlHeaderLen + int(le.Uint32(in[44:])) }

func TestReaderRejectsCorruptHeadersAndRecords(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	lx := libxlStart(t, in)
	xc := lx + libxlHeaderLen + 8 // after LIBXC_CONTEXT
	firstRec := xc + libxcIHeaderLen + libxcDHeaderLen
	// Find the first PAGE_DATA record.
	pd := firstRec
	for le.Uint32(in[pd:]) != RecPageData {
		pd += 8 + int(align8(uint64(le.Uint32(in[pd+4:]))))
	}
	cases := []struct {
		name string
		at   int
		val  []byte
		want error
	}{
		{"xl magic", 0, []byte("Xen saved domain, xx format"), ErrBadMagic},
		{"not a stream at all", 0, []byte("GIF89a.."), ErrBadMagic},
		{"xl byte order", 32, []byte{1, 2, 3, 4}, ErrUnsupported},
		{"xl legacy stream flag", 36, []byte{1, 0, 0, 0}, ErrUnsupported},
		{"xl unknown mandatory flag", 36, []byte{3, 1, 0, 0}, ErrUnsupported},
		{"xl optional data too long", 44, []byte{0xff, 0xff, 0xff, 0x7f}, ErrRecordTooLong},
		{"libxl ident", lx, []byte("LibxlFmX"), ErrBadMagic},
		{"libxl version", lx + 8, []byte{0, 0, 0, 9}, ErrUnsupported},
		{"libxl big endian", lx + 12, []byte{0, 0, 0, 1}, ErrUnsupported},
		{"libxl unknown mandatory record", lx + 16, []byte{0x44, 0, 0, 0}, ErrUnsupported},
		{"libxc marker", xc, []byte{0xff, 0xff, 0xff, 0}, ErrBadMagic},
		{"libxc id", xc + 8, []byte("XENG"), ErrBadMagic},
		{"libxc version", xc + 12, []byte{0, 0, 0, 7}, ErrUnsupported},
		{"libxc domain type", xc + 24, []byte{9, 0, 0, 0}, ErrBadHeader},
		{"libxc page shift", xc + 28, []byte{13, 0}, ErrUnsupported},
		{"record length over REC_LENGTH_MAX", firstRec + 4, []byte{0, 0, 0, 0x10}, ErrRecordTooLong},
		{"PAGE_DATA count zero", pd + 8, []byte{0, 0, 0, 0}, ErrBadRecord},
		{"PAGE_DATA count too large for length", pd + 8, []byte{0xff, 0xff, 0, 0}, ErrBadRecord},
		{"PAGE_DATA reserved page type", pd + 16 + 7, []byte{0x50}, ErrBadRecord},
		{"PAGE_DATA pfn turned XTAB (length mismatch)", pd + 16 + 7, []byte{0xf0}, ErrBadRecord},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(in)
			copy(b[c.at:], c.val)
			err := drain(b)
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if !strings.Contains(err.Error(), "byte") && !strings.Contains(err.Error(), "first bytes") {
				t.Fatalf("error %q does not say where", err)
			}
		})
	}
}

// Corrupting a PAGES frame in transit never yields a silently different
// stream: the checksum or the frame checks catch it.
func TestDecodeRejectsCorruptPageFrames(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	d := newTestDisk(t, in, 3)
	var frames bytes.Buffer
	if _, _, err := Encode(bytes.NewReader(in), &frames, d); err != nil {
		t.Fatal(err)
	}
	f := frames.Bytes()
	// Offsets of PAGES frame bodies.
	var bodies [][2]int
	for o := 0; o < len(f); {
		n := int(le.Uint32(f[o+1:]))
		if f[o] == FramePages {
			bodies = append(bodies, [2]int{o + frameHeaderLen, n})
		}
		o += frameHeaderLen + n
	}
	if len(bodies) == 0 {
		t.Fatal("no PAGES frames")
	}
	for i, b := range bodies {
		for _, rel := range []int{0, 5, 9, 17, b[1] / 2, b[1] - 1} {
			c := bytes.Clone(f)
			c[b[0]+rel] ^= 0x40
			var out bytes.Buffer
			_, err := Decode(bytes.NewReader(c), &out, d)
			if err == nil {
				t.Fatalf("frame %d byte %d flipped: decoded without error", i, rel)
			}
			if !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrBadFrame) && !errors.Is(err, ErrFallbackFailed) && !errors.Is(err, ErrTruncated) {
				t.Fatalf("frame %d byte %d flipped: %v", i, rel, err)
			}
		}
		if i > 3 {
			break
		}
	}
}

func TestXLHeaderListsTheDomainDisks(t *testing.T) {
	h := &XLHeader{Config: []byte(`{"c_info":{"name":"d"},"disks":[{"pdev_path":"/dev/vdb","vdev":"xvda","backend":"phy"}]}`)}
	d, err := h.Disks()
	if err != nil || len(d) != 1 || d[0].PdevPath != "/dev/vdb" || d[0].Vdev != "xvda" {
		t.Fatalf("Disks() = %+v, %v", d, err)
	}
	if _, err := (&XLHeader{Config: []byte("{")}).Disks(); !errors.Is(err, ErrBadHeader) {
		t.Fatalf("broken JSON: %v", err)
	}
}

func TestHelloCarriesTheRemoteCommand(t *testing.T) {
	var b bytes.Buffer
	argv := []string{"xl", "migrate-receive", "-d"}
	if err := WriteHello(&b, argv); err != nil {
		t.Fatal(err)
	}
	got, err := ReadHello(&b)
	if err != nil || strings.Join(got, " ") != "xl migrate-receive -d" {
		t.Fatalf("ReadHello = %q, %v", got, err)
	}
	if _, err := ReadHello(bytes.NewReader([]byte{FrameRaw, 0, 0, 0, 0})); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("not a hello: %v", err)
	}
}

// xl's permission to go (the bytes after libxl's END) crosses only after
// BeforeTrailer said yes; refused, the destination never sees it.
func TestBeforeTrailerGatesThePermissionToGo(t *testing.T) {
	in := loadFixture(t, fixtures[0].file)
	rd := NewReader(bytes.NewReader(in))
	for {
		tok, err := rd.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if tok.Layer == LayerTrailer {
			t.Fatalf("fixture already has a trailer; the test needs one without")
		}
	}
	goMsg := []byte("domain is yours, you are cleared to unpause")
	stream := append(append([]byte{}, in...), goMsg...)
	for _, refuse := range []bool{false, true} {
		t.Run(fmt.Sprintf("refuse=%v", refuse), func(t *testing.T) {
			a, b := net.Pipe()
			var rebuilt bytes.Buffer
			done := make(chan error, 1)
			go func() {
				defer b.Close()
				cmdInR, cmdInW := io.Pipe()
				cmdOutR, cmdOutW := io.Pipe()
				go func() {
					io.Copy(&rebuilt, cmdInR)
					cmdOutW.Close()
				}()
				_, err := Receive(context.Background(), b, cmdInW, cmdOutR, nil, ReceiveOptions{Wait: func() int { return 0 }})
				done <- err
			}()
			calls := 0
			_, err := Send(context.Background(), a, bytes.NewReader(stream), io.Discard, nil, SendOptions{BeforeTrailer: func() error {
				calls++
				if refuse {
					return errors.New("cancelled before go")
				}
				return nil
			}})
			a.Close()
			<-done
			if calls != 1 {
				t.Fatalf("BeforeTrailer called %d times, want once", calls)
			}
			if refuse {
				if err == nil {
					t.Fatal("Send succeeded although BeforeTrailer refused")
				}
				if bytes.Contains(rebuilt.Bytes(), goMsg) {
					t.Fatal("the permission to go reached the destination after a refusal")
				}
				return
			}
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			if !bytes.Equal(rebuilt.Bytes(), stream) {
				t.Fatalf("rebuilt %d bytes, want %d (with the go message)", rebuilt.Len(), len(stream))
			}
		})
	}
}
