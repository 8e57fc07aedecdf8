package wire_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/xenferry/xenferry/pkg/wire"
)

// A sender writes the stream header, a HEADER record, page batches (the
// page data is passed as its own part and never copied into a body) and
// END; the receiver loops over Next and parses each body by type.
func Example() {
	var conn bytes.Buffer // a net.Conn in the engine

	w := wire.NewWriter(&conn)
	h := wire.Header{Version: wire.Version, PageShift: wire.PageShift, NumPages: 4, Flags: wire.FlagDedup}
	pages := make([]byte, 2*wire.PageSize)
	pages[0] = 1
	_ = w.WriteStreamHeader()
	_ = w.Write(wire.TypeHeader, h.Marshal(nil))
	_ = w.Write(wire.TypePages, wire.PagesPrefix(nil, []uint64{0, 3}, 0), pages)
	_ = w.Write(wire.TypeZeroPages, wire.MarshalPFNs(nil, []uint64{1, 2}))
	_ = w.Write(wire.TypeEnd)
	if err := w.Flush(); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("wrote", w.Bytes(), "bytes")

	r := wire.NewReader(&conn)
	if err := r.ReadStreamHeader(); err != nil {
		fmt.Println(err)
		return
	}
	var pfns []uint64 // reused across records
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Println(err)
			return
		}
		switch rec.Type {
		case wire.TypeHeader:
			h, err := wire.ParseHeader(rec.Body)
			fmt.Println("header:", h.NumPages, "pages", err)
		case wire.TypePages:
			var data []byte
			pfns, _, data, err = wire.ParsePages(rec.Body, pfns)
			fmt.Println("pages:", pfns, len(data), "bytes", err)
		case wire.TypeZeroPages:
			pfns, err = wire.ParsePFNs(rec.Body, pfns)
			fmt.Println("zero pages:", pfns, err)
		case wire.TypeEnd:
			fmt.Println("end")
		}
	}
	// Output:
	// wrote 8352 bytes
	// header: 4 pages <nil>
	// pages: [0 3] 8192 bytes <nil>
	// zero pages: [1 2] <nil>
	// end
}
