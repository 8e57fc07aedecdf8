// Package xlstream reads, rewrites and rebuilds the stream that Xen's stock
// toolstack writes for `xl save` and `xl migrate`, so that xenferry can be
// the transport of `xl migrate -s CMD` without any change to Xen.
//
// # The stream of xl (what Reader parses)
//
// Three layers are nested; each starts with a header and is a sequence of
// records of the form {type uint32, length uint32, body, 0-7 zero pad to 8}:
//
//	xl save header      "Xen saved domain, xl format\n \0 \r" (32 bytes),
//	                    byteorder 0x01020304, mandatory flags (JSON|STREAMv2),
//	                    optional flags, optional data length, then the
//	                    optional data: {u32 len, libxl domain config JSON}
//	libxl header        "LibxlFmt" (big endian), version 2, options
//	libxl records       LIBXC_CONTEXT (1, empty body) hands the stream to
//	                    libxc until libxc's END or CHECKPOINT record;
//	                    EMULATOR_* (2, 3) carry the device model's state;
//	                    END (0) closes the libxl stream
//	libxc image header  marker 0xFFFFFFFFFFFFFFFF, "XENF", version 2 or 3,
//	                    options (big endian); domain header {type, page
//	                    shift, xen version} (little endian)
//	libxc records       PAGE_DATA (1): {count, _res, pfn[count] (type in
//	                    bits 60-63), then 4 KiB for each pfn whose type
//	                    carries data}; vCPU, shared info, TSC, HVM context
//	                    and params, CPUID/MSR policy, ...; END (0)
//	trailer             after libxl's END: bytes of xl's own handshake
//	                    (migration only), passed on verbatim
//
// Everything is little endian except the image/libxl headers, as the
// specifications (libxc-migration-stream, libxl-migration-stream) say; a
// big-endian stream is rejected.
//
// # The transport (what Encoder writes and Decoder reads)
//
// The source side rewrites PAGE_DATA records only; everything else is
// copied. A frame is {kind uint8, length uint32 LE, body}:
//
//	+------+--------+----------------------------------------------------+
//	| kind | length | body                                               |
//	+------+--------+----------------------------------------------------+
//	| RAW  |   n    | n bytes of the original stream, verbatim           |
//	| PAGES|   n    | record header (8) | count,_res (8) | pfn encoding:  |
//	|      |        | 0 = pfn[count] as in the record, 1 = runs {u32 n,  |
//	|      |        | n x {first entry u64, length u32}} | record        |
//	|      |        | checksum xxh3-64 (8) | kind[N] (1 each)            |
//	|      |        | then per data page: DATA 4096 bytes | ZERO nothing |
//	|      |        | REF {disk u8, offset u64, hash [16]} (25 bytes)    |
//	|PAGESZ|   n    | as PAGES up to the kinds, then the REFs and DATA   |
//	|      |        | pages as one zstd frame (only to a destination     |
//	|      |        | that publishes the codec; EnableCompression)       |
//	| FALL |  4104  | ref sequence number u64 | the page (fallback)      |
//	| END  |   0    | the source's input ended                           |
//	+------+--------+----------------------------------------------------+
//
// A source with compression enabled (Encoder.EnableCompression) sends a
// record as PAGESZ when wire.Compressor finds that it pays: by the link's
// rate, or by the time the source waits for xl anyway. The destination
// decompresses into at most one record's worth and checks the length
// against the kinds before anything else.
//
// The destination rebuilds each PAGE_DATA record byte for byte: zero pages
// are zero, a REF is read from the shared disk and verified against its
// hash (PageResolver); a REF that fails verification is asked for again
// (NEED, with its sequence number) and the source answers with a FALL
// frame from the window of REF pages it keeps until they are acknowledged.
// The rebuilt record must match the source's checksum before a single byte
// of it is handed to `xl migrate-receive`, so a rebuild bug or a corrupted
// reference can fail a migration (and xl resumes the domain at the source)
// but cannot corrupt a guest.
package xlstream
