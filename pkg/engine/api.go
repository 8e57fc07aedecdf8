package engine

import (
	"context"
	"net"
	"time"
)

// Strategy selects how memory moves.
type Strategy string

const (
	// StrategyXen replicates stock libxc: every page in round 1 (zeros
	// included), dirty rounds, stop when < 50 pages dirty or after 5 rounds.
	StrategyXen Strategy = "xen"
	// StrategyPreCopy is our pre-copy: zero pages as pfn lists, adaptive policy.
	StrategyPreCopy Strategy = "precopy"
	// StrategyPreCopyDedup adds disk references for pages found on the disk.
	StrategyPreCopyDedup Strategy = "precopy+dedup"
	// StrategyPostCopy resumes at once and pushes everything afterwards.
	StrategyPostCopy Strategy = "postcopy"
	// StrategyHybrid runs pre-copy while it pays, then switches to post-copy.
	StrategyHybrid Strategy = "hybrid"
	// StrategyHybridDedup is hybrid with disk references.
	StrategyHybridDedup Strategy = "hybrid+dedup"
)

// Strategies lists every strategy, in the benchmark's order.
var Strategies = []Strategy{StrategyXen, StrategyPreCopy, StrategyPreCopyDedup, StrategyPostCopy, StrategyHybrid, StrategyHybridDedup}

// Options are the knobs of one outgoing migration.
type Options struct {
	Strategy Strategy
	// LinkBytesPerSec caps the bytes put on the wire (all streams); 0 = none.
	LinkBytesPerSec int64
	// MaxDowntime is the downtime budget the adaptive policy aims for.
	MaxDowntime time.Duration
	// CompletionTimeout bounds pre-copy before a switch to post-copy (when
	// allowed) or an abort; 0 = the policy's default.
	CompletionTimeout time.Duration
	// Streams is the number of parallel data connections (>= 1).
	Streams int
	// Compress enables zstd for full pages.
	Compress bool
	// MigrationID names the migration to the receiver; Token authenticates it.
	MigrationID string
	Token       []byte
	// RecoveryTimeout bounds reconnection attempts when the link breaks
	// during post-copy (0: RecoveryTimeout).
	RecoveryTimeout time.Duration
	// DurableDir, if set, is a directory on shared storage where the source
	// mirrors not-yet-delivered pages during post-copy.
	DurableDir string
	// DemandPath is where the answers to post-copy demand requests travel
	// ("" = DemandPriorityConn).
	DemandPath DemandPath
	// Dial opens every connection to the destination (main, data,
	// priority, recovery); nil dials plain TCP. The engine is otherwise
	// transport-agnostic: a TLS dialer goes here.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
}

// DemandPath selects how post-copy demand answers get ahead of the push.
// Requests always travel on the priority connection (they are small and
// go the other way).
type DemandPath string

const (
	// DemandPriorityConn answers on a connection of their own, as QEMU's
	// postcopy-preempt channel does: nothing of the push is ever ahead.
	DemandPriorityConn DemandPath = "priority"
	// DemandInline answers on the data stream that carries the page's
	// partition, with strict priority: the stream's sender serves pending
	// requests before it takes the next background page, and the answer
	// draws its bandwidth without waiting. What the stream already handed
	// to the kernel is still ahead of it.
	DemandInline DemandPath = "inline"
)

// Valid reports whether p is a known demand path ("" included).
func (p DemandPath) Valid() bool {
	return p == "" || p == DemandPriorityConn || p == DemandInline
}

// Phase is where a migration is, as the engine reports it.
type Phase string

const (
	PhaseConnecting  Phase = "Connecting"
	PhasePreCopy     Phase = "PreCopy"
	PhaseStopAndCopy Phase = "StopAndCopy"
	PhasePostCopy    Phase = "PostCopy"
	PhaseRecovering  Phase = "Recovering"
	PhaseDone        Phase = "Done"
)

// PageCounts counts pages by how they crossed (or did not cross) the wire.
type PageCounts struct {
	Total        uint64 `json:"total"`
	Full         uint64 `json:"full"`
	Zero         uint64 `json:"zero"`
	Disk         uint64 `json:"disk"`
	DiskFallback uint64 `json:"diskFallback"`
	Resent       uint64 `json:"resent"`
	Demand       uint64 `json:"demand"`
}

// Progress is a snapshot reported while a migration runs. Percent never
// decreases within one migration.
type Progress struct {
	Phase Phase `json:"phase"`
	// Committed: the destination was told to run the domain ("go"); from
	// here on the source never resumes it without the destination's
	// verdict. Callers treat it as the point of no return.
	Committed            bool       `json:"committed,omitempty"`
	Round                int        `json:"round"`
	WireBytes            int64      `json:"wireBytes"`
	RemainingBytes       int64      `json:"remainingBytes"`
	DirtyRateBytesPerSec float64    `json:"dirtyRateBytesPerSec"`
	WireBytesPerSec      float64    `json:"wireBytesPerSec"`
	Percent              float64    `json:"percent"`
	Pages                PageCounts `json:"pages"`
}

// Result is the outcome of a migration, from the source's point of view
// (destination-side figures travel back on the return path).
type Result struct {
	Strategy        Strategy      `json:"strategy"`
	MemoryBytes     uint64        `json:"memoryBytes"`
	Total           time.Duration `json:"total"`    // start until the source is released
	Downtime        time.Duration `json:"downtime"` // paused until running at the destination
	Resume          time.Duration `json:"resume"`   // start until running at the destination
	WireBytes       int64         `json:"wireBytes"`
	Iterations      int           `json:"iterations"`
	Pages           PageCounts    `json:"pages"`
	FaultP50        time.Duration `json:"faultP50"`
	FaultP99        time.Duration `json:"faultP99"`
	Verified        bool          `json:"verified"`   // every page matched the manifest at the destination
	StopReason      string        `json:"stopReason"` // why pre-copy ended
	PostCopy        bool          `json:"postCopy"`
	OpsBefore       float64       `json:"opsBefore"` // workload ops/s before migration
	OpsPostCopy     float64       `json:"opsPostCopy"`
	DedupSavedBytes int64         `json:"dedupSavedBytes"`
	// DurableMirror: the post-copy pages were mirrored to DurableDir.
	DurableMirror bool `json:"durableMirror"`
	// StreamBytesPerSec is the wire rate while pre-copy rounds stream
	// pages (their wire bytes over their duration).
	StreamBytesPerSec float64 `json:"streamBytesPerSec"`
}
