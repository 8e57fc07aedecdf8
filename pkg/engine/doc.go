// Package engine is xenferry's migration data path: the source streams a
// domain's memory to a destination agent over TCP, with pre-copy rounds,
// stop-and-copy or early resume (post-copy), disk-dedup references and a
// per-page hash manifest checked at the destination before it resumes.
//
// # Connections
//
// A migration uses one main connection, Options.Streams data connections
// and one priority connection, each opened by the source with the stream
// header and a "hello" control message (migration ID, token, role, stream
// index). The destination answers every hello with its own stream header
// and "hello" (welcome) or "error" (why not). The main connection is
// welcomed first; the others attach to its session. Records are those of
// package wire.
//
// # Message sequence
//
// Main connection, source (S) and destination (D); "ctl x" is a CONTROL
// record of kind x. The destination's state after each step is in
// brackets (session.go's mainAllowed is the table of what each state
// accepts; ctl error is accepted in every state and fails the migration):
//
//	S: HEADER (pages, flags, the sender's domain config)  [awaitHeader]
//	D: ctl prepared: target domain created, paused         [receiving]
//	   data streams: PAGES, ZERO_PAGES, DISK_REFS; D asks for the pages of
//	   references it cannot resolve with REQUEST (fallback) on main
//	S: ctl drain, after a "drain" flush marker on every data stream
//	   (and, before a stop-and-copy, the MANIFEST of every page as last
//	   sent)                                               [draining]
//	D: ctl drained: everything before the markers is installed
//	                                                       [receiving]
//	then either a stop-and-copy:
//	S: flush marker "complete" on every data stream, STATE, MANIFEST...
//	   (of the pages resent since the drain's, else of every page),
//	   ctl complete                                        [verifying]
//	D: every page checked against the manifest; ctl ready  [verified]
//	S: ctl go (the source never resumes the domain after this)
//	D: domain resumed; ctl resumed                         [resumed]
//	S: END on every connection (the source released the domain)
//	or a post-copy:
//	S: flush marker "postcopy" on every data stream, STATE, BITMAP of the
//	   pages still to come, ctl postcopy                   [arming]
//	D: lazy loading armed; ctl ready                       [armed]
//	S: ctl go
//	D: domain resumed; ctl resumed                         [postCopy]
//	   data streams push the rest; D asks for faulted pages with REQUEST
//	   (demand) on the priority connection, answered there (or inline)
//	S: flush marker "pushed" on every data stream, MANIFEST..., ctl pushed
//	                                                       [completing]
//	D: every page present and checked: ctl done            [finished]
//	   or a page does not match: the domain is destroyed here, ctl
//	   discarded (the source may resume its copy)           [failed]
//	S: END on every connection
//
// If a connection breaks during post-copy, the destination waits
// [recovering] for the source to reconnect with a "recover" main
// connection; it answers with a BITMAP of the pages it has, the source
// reopens the data and priority connections and resumes the push
// [postCopy].
//
// Data streams accept pages only in the states that expect them; after
// the stream's "complete" marker, and after its "postcopy" marker until
// the domain runs here, only the pages the destination asked for
// (fallbacks for references it could not resolve).
//
// # Limits at the destination
//
// Nothing a peer sends is trusted for what it allocates or opens: records
// are bounded by package wire (MaxBody; MaxBatchPages entries per pfn
// list, reference list or request; MaxManifestHashes per manifest); the
// header's page count is checked against the Grant (or MaxPages) before
// any per-page state exists; references name only the granted disks, by
// ID, within their size; connections not yet authorised are bounded
// (MaxPreAuth) and read at most a small hello; incoming migrations are
// bounded (MaxSessions); every write has a deadline (WriteTimeout), and a
// source silent on all of a migration's connections while the destination
// waits for it is dropped (IdleTimeout). A panic at any connection's
// boundary fails that migration only.
package engine
