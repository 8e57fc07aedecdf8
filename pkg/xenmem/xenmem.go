// Package xenmem gives the migration engine access to a domain's guest memory,
// its dirty-page log, its vCPU/device state and its life cycle, behind one
// interface with two backends: the simulated host (package sim) and real Xen.
//
// Page frame numbers (pfns) index guest memory in PageSize units from 0 to
// NumPages()-1. Per-page state is always a Bitmap, never a map.
package xenmem

import (
	"context"
	"errors"
	"time"
)

// PageSize is the guest page size: 4 KiB, as on x86 Xen.
const PageSize = 4096

// PageShift is log2(PageSize).
const PageShift = 12

// State is the run state of a domain.
type State string

const (
	StateRunning   State = "Running"
	StatePaused    State = "Paused"
	StateIncoming  State = "Incoming"  // being received; not yet resumed
	StateMigrating State = "Migrating" // source side of an outgoing migration
	StateShutdown  State = "Shutdown"
)

// Disk is one virtual disk of a domain as configured on this host.
type Disk struct {
	// ID names the disk within the domain (xvda, hda, ...); references carry it.
	ID string `json:"id"`
	// Path is the host path of the image or block device (shared storage).
	Path string `json:"path"`
	// ReadOnly disks are never written by the guest.
	ReadOnly bool `json:"readOnly,omitempty"`
}

// DomainInfo describes a domain, in the same form for every backend.
type DomainInfo struct {
	ID          int               `json:"id"`
	Name        string            `json:"name"`
	UUID        string            `json:"uuid,omitempty"`
	MemoryBytes uint64            `json:"memoryBytes"`
	VCPUs       int               `json:"vcpus"`
	Disks       []Disk            `json:"disks,omitempty"`
	State       State             `json:"state"`
	Namespace   string            `json:"namespace,omitempty"` // Kubernetes namespace from the domain's config
	Labels      map[string]string `json:"labels,omitempty"`
	// Config is the backend's opaque domain configuration; the destination
	// re-creates the domain from it.
	Config []byte `json:"config,omitempty"`
	// CPUTime is the CPU time the domain's vCPUs used so far on this host,
	// cumulative (sim: the guest process's user+system time; xen: xl
	// list's Time(s)). It restarts from zero when the domain arrives on a
	// host, so readers take differences and treat a decrease as a restart.
	// Set by Host.Domains; 0 where the backend cannot tell.
	CPUTime time.Duration `json:"cpuTime,omitempty"`
	// PageWrites is the number of guest page writes so far, cumulative,
	// where the backend counts them (sim: the workload's write counters);
	// 0 where it cannot tell (xen). Set by Host.Domains.
	PageWrites uint64 `json:"pageWrites,omitempty"`
}

// HostInfo describes the host.
type HostInfo struct {
	Name             string `json:"name"`
	Backend          string `json:"backend"` // "sim" or "xen"
	Version          string `json:"version"` // hypervisor version
	TotalMemoryBytes uint64 `json:"totalMemoryBytes"`
	FreeMemoryBytes  uint64 `json:"freeMemoryBytes"`
	CPUs             int    `json:"cpus"`
	// Capabilities say which migrations this host's data path can carry.
	Capabilities Capabilities `json:"capabilities"`
}

// Transports: how a host's memory crosses to another host.
const (
	// TransportEngine is xenferry's own engine (pkg/engine): pre-copy,
	// post-copy and hybrid, with disk dedup, on a backend that can map and
	// lazily load guest memory.
	TransportEngine = "engine"
	// TransportXL is the stock toolstack: `xl migrate` with xenferry's xl
	// transport (dedup of the libxc stream), pre-copy only.
	TransportXL = "xl"
)

// Capabilities of a host's data path. Two hosts can run a strategy only
// if both list it and share the transport.
type Capabilities struct {
	Transport string `json:"transport"`
	// Strategies the host can run: "precopy", "postcopy", "hybrid".
	Strategies []string `json:"strategies"`
	// Dedup: pages equal to blocks of the domain's shared disk go as
	// references.
	Dedup bool `json:"dedup"`
	// EarlyResume: the domain can run on the target before all its memory
	// arrived (post-copy and hybrid).
	EarlyResume bool `json:"earlyResume"`
	// Compression lists the codecs of compressed page batches the data
	// path decodes ("zstd").
	Compression []string `json:"compression,omitempty"`
}

// Errors shared by the backends.
var (
	ErrNoDomain      = errors.New("xenmem: no such domain")
	ErrExists        = errors.New("xenmem: domain already exists")
	ErrNoMemory      = errors.New("xenmem: not enough free memory")
	ErrNotSupported  = errors.New("xenmem: not supported by this backend")
	ErrPageExists    = errors.New("xenmem: page already present")
	ErrBackendAbsent = errors.New("xenmem: backend not available on this host")
	// ErrCommitted: the destination was told to run the domain (Commit), so
	// this host must not run it again; only Reclaim or Release may follow.
	ErrCommitted = errors.New("xenmem: domain committed to the destination")
)

// Host is one hypervisor host.
type Host interface {
	Info(ctx context.Context) (HostInfo, error)
	Domains(ctx context.Context) ([]DomainInfo, error)
	// OpenSource takes a running domain for an outgoing migration.
	OpenSource(ctx context.Context, name string) (SourceDomain, error)
	// CreateTarget creates a paused, empty domain to receive info's memory.
	// Its memory reads as zero until pages are installed.
	CreateTarget(ctx context.Context, info DomainInfo) (TargetDomain, error)
	Close() error
}

// MemoryPeeker is implemented by a Host that can read a running domain's
// memory without taking it for a migration (the agent's cost prediction
// samples memory this way; a migration may start meanwhile).
type MemoryPeeker interface {
	// PeekPages copies the consecutive pages first, first+1, ... of the
	// named domain into dst (len(dst)/PageSize of them), as the guest
	// holds them now; the guest may write them meanwhile. It fails with an
	// error wrapping ErrNoDomain once the domain is gone from this host.
	PeekPages(ctx context.Context, name string, first uint64, dst []byte) error
}

// SourceDomain is the source half of a migration.
type SourceDomain interface {
	Info() DomainInfo
	NumPages() uint64
	// Memory is a read-only view of guest memory, NumPages()*PageSize bytes,
	// valid until Close. The guest may write it concurrently while running.
	Memory() []byte
	// ReadPages copies the consecutive pages first, first+1, ... into dst
	// (len(dst)/PageSize of them), as Memory() holds them, through the
	// backend's own path (libxc maps a batch; the simulated host reads its
	// memory file, which costs less than a first touch of the mapping).
	// The guest may write the pages meanwhile, as with Memory().
	ReadPages(first uint64, dst []byte) error
	// EnableDirtyLog starts exact 4 KiB dirty tracking (Xen's log-dirty).
	EnableDirtyLog() error
	// ReadDirty ORs into dst the pages written since the previous call (or
	// since EnableDirtyLog) and clears the log, atomically with respect to
	// guest writes: a write is reported by this call or by the next one.
	ReadDirty(dst *Bitmap) error
	DisableDirtyLog() error
	// Pause stops every vCPU; when it returns no guest write is in flight.
	Pause() error
	// Resume restarts the vCPUs. After Commit it refuses with an error
	// wrapping ErrCommitted.
	Resume() error
	// SaveState returns the vCPU and device state; the domain must be paused.
	SaveState() ([]byte, error)
	// Ops is the workload's progress counter (operations done), for slowdown.
	Ops() uint64
	// Commit marks the point of no return: the caller is about to tell the
	// destination to run the domain. The domain must be paused. From then
	// on the handle never resumes it: Resume returns an error wrapping
	// ErrCommitted and Close leaves it paused (dirty logging off), whatever
	// happens to the migration. A domain committed by an earlier handle
	// cannot be committed again until Reclaim or Release resolves it.
	Commit() error
	// Reclaim resumes a committed, unreleased domain here. It is called
	// only on an explicit verdict that the destination does not and never
	// will run the domain (its "discarded", or an operator's decision from
	// observed facts); reason is logged. It fails on a domain not
	// committed or already released.
	Reclaim(reason string) error
	// Release destroys the domain after it runs elsewhere. Irreversible.
	Release() error
	// Close drops the handle. A domain not released and not committed
	// keeps running (or is resumed if this handle paused it); a committed
	// one stays paused until Reclaim or Release.
	Close() error
}

// TargetDomain is the destination half of a migration.
type TargetDomain interface {
	Info() DomainInfo
	NumPages() uint64
	// Memory is a read-only view of guest memory (tests and diagnostics).
	Memory() []byte
	// WritePages installs pages before the domain first runs (pre-copy):
	// page i of data (PageSize bytes each) goes to pfns[i]. It is how a
	// backend fills a domain it is building, as libxc's restore populates
	// and copies a batch, and it may be much cheaper than writing through
	// Memory(): a store into a page the process has not mapped yet takes a
	// page fault. Not for use after StartLazy.
	WritePages(pfns []uint64, data []byte) error
	// LoadState installs vCPU/device state from SaveState.
	LoadState(state []byte) error
	// StartLazy arms lazy loading (post-copy): every page not installed so
	// far (present says which are) faults on first guest access and is
	// reported through the returned Lazy. Call before Resume.
	StartLazy(present *Bitmap) (Lazy, error)
	// Resume starts the vCPUs; the domain now runs here.
	Resume() error
	Ops() uint64
	// Destroy removes the domain and everything created for it (abort path).
	Destroy() error
	Close() error
}

// Fault is a guest access to a page that is not present yet.
type Fault struct {
	PFN   uint64
	Write bool
	// RaisedNanos is the monotonic time (CLOCK_MONOTONIC ns) the fault was read.
	RaisedNanos int64
}

// Lazy installs pages into a running domain that faults on missing pages.
// Install and InstallZero are atomic per page: a page already present (guest
// wrote it, or an earlier install) is left alone and ErrPageExists returned.
// Installing wakes every vCPU waiting on that page.
type Lazy interface {
	// Faults delivers missing-page faults; it is closed by Close.
	Faults() <-chan Fault
	Install(pfn uint64, data []byte) error
	InstallZero(pfn uint64) error
	// InstallRun installs the consecutive pages first, first+1, ... with
	// the contents of data (PageSize bytes each), or zero pages when data
	// is nil, in as few kernel calls as the run allows; each page is
	// atomic as with Install. exists[i] is set for a page that was present
	// already and left alone; it must have room for every page of the run.
	InstallRun(first uint64, n int, data []byte, exists []bool) error
	// Present reports whether pfn is installed.
	Present(pfn uint64) bool
	// Close stops fault delivery; every page must be present by then or the
	// domain is being destroyed.
	Close() error
}

// Runs calls fn(i, j) for each maximal run pfns[i:j] of consecutive pfns
// (each one more than the one before), in order, and stops at the first
// error, which it returns.
func Runs(pfns []uint64, fn func(i, j int) error) error {
	for i := 0; i < len(pfns); {
		j := i + 1
		for j < len(pfns) && pfns[j] == pfns[j-1]+1 {
			j++
		}
		if err := fn(i, j); err != nil {
			return err
		}
		i = j
	}
	return nil
}
