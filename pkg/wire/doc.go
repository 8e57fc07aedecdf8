// Package wire is xenferry's migration stream format: a versioned sequence of
// 8-byte-aligned, checksummed records that carries a domain's memory, state
// and control messages from a source agent to a destination agent (and page
// requests back).
//
// # Stream layout
//
// All integers are little-endian. A stream is a 16-byte stream header
// followed by records until the sender writes an END record (or, on a
// control connection, until the connection closes at a record boundary).
//
//	Stream header (16 bytes)
//	+--------+--------+--------+--------+--------+--------+--------+--------+
//	|  'X'   |  'F'   |  'E'   |  'R'   |  'R'   |  'Y'   |  '\r'  |  '\n'  |  magic
//	+--------+--------+--------+--------+--------+--------+--------+--------+
//	|           version (u32) = 1       |          flags (u32) = 0          |
//	+-----------------------------------+-----------------------------------+
//
//	Record (16-byte header, body, zero padding to a multiple of 8)
//	+-----------------------------------+-----------------------------------+
//	|             type (u32)            |           bodyLen (u32)           |
//	+-----------------------------------+-----------------------------------+
//	|             crc (u32)             |         reserved (u32) = 0        |
//	+-----------------------------------+-----------------------------------+
//	|                          body (bodyLen bytes)                         |
//	|                                  ...                                  |
//	|                   +---------------------------------------------------+
//	|                   |   zero padding ((8 - bodyLen%8) % 8 bytes)        |
//	+-------------------+---------------------------------------------------+
//
//	type     bit 31 (Optional) set: a reader that does not know the type
//	         skips the record; clear: an unknown type is an error.
//	bodyLen  at most MaxBody (8 MiB + 64 KiB); a longer length is rejected
//	         before anything is allocated.
//	crc      CRC-32C (Castagnoli) over type (4 bytes LE), bodyLen (4 bytes
//	         LE) and the body, so a corrupted type or length is caught as well
//	         as a corrupted body. It is checked for skipped records too.
//	reserved and padding must be zero; anything else is an error.
//
// # Record bodies
//
//	HEADER     (1)  u32 version, u32 pageShift (12), u64 numPages, u64 flags,
//	                u32 configLen, u32 0, config[configLen]
//	PAGES      (2)  u32 count (<= MaxBatchPages), u32 flags, u64 pfn[count],
//	                then count*4096 raw bytes, or (flags&PagesZstd) one zstd
//	                frame that decompresses to count*4096 bytes
//	ZERO_PAGES (3)  u32 count, u32 0, u64 pfn[count]
//	DISK_REFS  (4)  u32 count, u32 0, count * {u64 pfn, u32 disk, u32 0,
//	                u64 offset, [16]byte hash}
//	STATE      (5)  opaque vCPU/device state
//	MANIFEST   (6)  u64 firstPFN, u32 count, u32 0, count * [16]byte hash
//	CONTROL    (7)  JSON of Control (handshake and low-rate messages)
//	END        (8)  empty
//	REQUEST    (9)  u32 reason, u32 count, u64 pfn[count]
//	BITMAP     (10) u64 firstPFN, u64 nbits, u64 word[ceil(nbits/64)];
//	                bits past nbits in the last word are zero
//	ROUND_END  (11|Optional) JSON with round statistics
//
// Every Parse function checks each count against the body length before
// it allocates or indexes anything, rejects non-zero reserved fields, and
// never panics; errors wrap the package sentinels (ErrMalformed, ...) so
// callers can test them with errors.Is.
//
// The layout borrows its framing ideas (aligned type/length records, an
// optional bit, a hard record length limit, a mandatory END) from the Xen
// libxc migration stream v2 and the gVisor state file.
package wire
