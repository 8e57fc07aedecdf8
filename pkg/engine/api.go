package engine

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/xenferry/xenferry/pkg/wire"
)

// Strategy names a preset Plan: the names the CRD, the node agent's
// command line and migbench use. The engine itself only looks at the Plan
// a name stands for (PresetPlan).
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
	// StrategyHybrid pre-copies, then finishes with a short stop-and-copy
	// or, when the policy finds it faster, with post-copy.
	StrategyHybrid Strategy = "hybrid"
	// StrategyHybridDedup is hybrid with disk references (the default).
	StrategyHybridDedup Strategy = "hybrid+dedup"
)

// DefaultStrategy is the preset used when Options names neither a
// strategy nor a plan.
const DefaultStrategy = StrategyHybridDedup

// Strategies lists every preset, in the benchmark's order.
var Strategies = []Strategy{StrategyXen, StrategyPreCopy, StrategyPreCopyDedup, StrategyPostCopy, StrategyHybrid, StrategyHybridDedup}

// PolicyKind selects the pre-copy policy.
type PolicyKind string

const (
	// PolicyAdaptive: stop-and-copy once the rest fits the downtime
	// budget, post-copy (when allowed) once it finishes sooner than more
	// pre-copy would (AdaptivePolicy).
	PolicyAdaptive PolicyKind = "adaptive"
	// PolicyXen: libxc's simple pre-copy policy (XenPolicy).
	PolicyXen PolicyKind = "xen"
)

// PostCopyMode says whether and when a migration may resume the domain
// at the destination before all its memory is there.
type PostCopyMode string

const (
	// PostCopyNever: the migration ends with a stop-and-copy.
	PostCopyNever PostCopyMode = "never"
	// PostCopyOnPolicy: the policy chooses between stop-and-copy and
	// post-copy at each of its decisions.
	PostCopyOnPolicy PostCopyMode = "on-policy"
	// PostCopyImmediate: no pre-copy; the domain resumes at once.
	PostCopyImmediate PostCopyMode = "immediate"
)

// Plan is how memory moves, as orthogonal choices. The zero Plan is not
// valid; presets fill every field.
type Plan struct {
	Policy PolicyKind `json:"policy"`
	// ElideZero sends zero pages as pfn lists; without it every page
	// travels whole (stock libxc).
	ElideZero bool `json:"elideZero"`
	// Dedup sends pages found on the domain's disks as references
	// (Hooks.Disks must be set, else it has no effect).
	Dedup    bool         `json:"dedup"`
	PostCopy PostCopyMode `json:"postCopy"`
}

// PresetPlan returns the plan a strategy name stands for.
func PresetPlan(s Strategy) (Plan, bool) {
	switch s {
	case StrategyXen:
		return Plan{Policy: PolicyXen, PostCopy: PostCopyNever}, true
	case StrategyPreCopy:
		return Plan{Policy: PolicyAdaptive, ElideZero: true, PostCopy: PostCopyNever}, true
	case StrategyPreCopyDedup:
		return Plan{Policy: PolicyAdaptive, ElideZero: true, Dedup: true, PostCopy: PostCopyNever}, true
	case StrategyPostCopy:
		return Plan{Policy: PolicyAdaptive, ElideZero: true, PostCopy: PostCopyImmediate}, true
	case StrategyHybrid:
		return Plan{Policy: PolicyAdaptive, ElideZero: true, PostCopy: PostCopyOnPolicy}, true
	case StrategyHybridDedup:
		return Plan{Policy: PolicyAdaptive, ElideZero: true, Dedup: true, PostCopy: PostCopyOnPolicy}, true
	}
	return Plan{}, false
}

// Validate reports what is wrong with a plan.
func (p Plan) Validate() error {
	switch p.Policy {
	case PolicyAdaptive, PolicyXen:
	default:
		return fmt.Errorf("engine: unknown policy %q (want %q or %q)", p.Policy, PolicyAdaptive, PolicyXen)
	}
	switch p.PostCopy {
	case PostCopyNever, PostCopyOnPolicy, PostCopyImmediate:
	default:
		return fmt.Errorf("engine: unknown post-copy mode %q (want %q, %q or %q)", p.PostCopy, PostCopyNever, PostCopyOnPolicy, PostCopyImmediate)
	}
	return nil
}

// String names the plan: its preset's name when it is one.
func (p Plan) String() string {
	for _, s := range Strategies {
		if q, _ := PresetPlan(s); q == p {
			return string(s)
		}
	}
	return fmt.Sprintf("%s,zero=%t,dedup=%t,postcopy=%s", p.Policy, p.ElideZero, p.Dedup, p.PostCopy)
}

// Valid reports whether s names a preset.
func (s Strategy) Valid() bool {
	_, ok := PresetPlan(s)
	return ok
}

// resolvePlan is the plan options ask for: a preset's by name, or Plan
// itself; neither means DefaultStrategy's. Both is an error: a preset
// with changes is PresetPlan's result, changed.
func resolvePlan(o Options) (Plan, error) {
	if o.Strategy != "" {
		if o.Plan != (Plan{}) {
			return Plan{}, fmt.Errorf("engine: options name strategy %q and a plan; set one", o.Strategy)
		}
		p, ok := PresetPlan(o.Strategy)
		if !ok {
			return Plan{}, fmt.Errorf("engine: unknown strategy %q (want one of %v)", o.Strategy, Strategies)
		}
		return p, nil
	}
	if o.Plan == (Plan{}) {
		p, _ := PresetPlan(DefaultStrategy)
		return p, nil
	}
	return o.Plan, o.Plan.Validate()
}

// Options are the knobs of one outgoing migration.
type Options struct {
	// Strategy names a preset plan (PresetPlan); Plan sets the choices
	// one by one. Set at most one; neither means DefaultStrategy.
	Strategy Strategy
	Plan     Plan
	// LinkBytesPerSec caps the bytes put on the wire (all streams); 0 = none.
	LinkBytesPerSec int64
	// MaxDowntime is the downtime budget the adaptive policy aims for
	// (0: DefaultMaxDowntime).
	MaxDowntime time.Duration
	// CompletionTimeout bounds pre-copy before a switch to post-copy (when
	// allowed) or an abort; 0 = the policy's default.
	CompletionTimeout time.Duration
	// Streams is the number of parallel data connections (>= 1).
	Streams int
	// Compress lets each data stream compress batches of full pages with
	// zstd when the measured ratio and encoder rate make that faster than
	// sending them raw on its share of the link (wire.Compressor).
	Compress bool
	// CompressAlways (with Compress) sends every batch that shrinks
	// compressed, whatever the link's rate: for links where bytes cost
	// more than CPU time.
	CompressAlways bool
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
	// Plan is what the migration ran (Strategy names its preset, if any).
	Plan Plan `json:"plan"`
	// Costs are the fixed costs, measured one by one.
	Costs Costs `json:"costs"`
	// Compression: what the adaptive compressors of the data streams did
	// with full-page batches (Options.Compress).
	Compression wire.CompressorStats `json:"compression"`
}

// Costs are the time a migration spends around its bytes, step by step.
// Handshake overlaps the first pre-copy round (the source streams while
// the destination creates the domain); the others are on the critical
// path.
type Costs struct {
	// Connect: dial and hello of every connection (in parallel).
	Connect time.Duration `json:"connect"`
	// Handshake: header sent until the destination said it created the
	// target domain.
	Handshake time.Duration `json:"handshake"`
	// Drain: drain markers sent, domain still running, until the
	// destination installed everything sent before them.
	Drain time.Duration `json:"drain"`
	// Manifest: time to hand the manifest to the main connection (its
	// bytes included).
	Manifest time.Duration `json:"manifest"`
	// Complete: from the last data sent (stop-and-copy: the switch-over
	// data; post-copy: the push) until the destination said every page
	// matched the manifest.
	Complete time.Duration `json:"complete"`
	// Release: the source domain released (destroyed: it can never run
	// here again) and the connections ended.
	Release time.Duration `json:"release"`
}
