package agent

// Disks are indexed ahead of need: when the agent finds a domain, it
// builds (or loads) the dedup index of each of its disks in the
// background, one disk at a time, and reports the progress in the
// XenDomain's status. A migration then finds the index ready instead of
// reading the disk while it runs.

import (
	"context"
	"sync"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// indexQueue bounds the disks waiting to be indexed; a disk that does not
// fit is asked for again at the next publish.
const indexQueue = 64

type diskIndexState struct {
	done, total int64
	ready       bool
	err         string
}

// diskIndexer indexes disks one at a time, in the order publish asks.
type diskIndexer struct {
	mu    sync.Mutex
	state map[string]*diskIndexState // by disk path; pruned to the disks of the domains here
	queue chan string
}

func newDiskIndexer() *diskIndexer {
	return &diskIndexer{state: map[string]*diskIndexState{}, queue: make(chan string, indexQueue)}
}

// want asks for the index of a disk once; it never blocks.
func (x *diskIndexer) want(path string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if _, ok := x.state[path]; ok {
		return
	}
	select {
	case x.queue <- path:
		x.state[path] = &diskIndexState{}
	default:
	}
}

// keep forgets the disks not in paths (domains gone from this host).
func (x *diskIndexer) keep(paths map[string]bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for p, st := range x.state {
		if !paths[p] && (st.ready || st.err != "") {
			delete(x.state, p)
		}
	}
}

// status is the XenDomain status of a domain's disks.
func (x *diskIndexer) status(disks []xenmem.Disk) []v1.DiskIndexStatus {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []v1.DiskIndexStatus
	for _, d := range disks {
		st, ok := x.state[d.Path]
		if !ok {
			continue
		}
		s := v1.DiskIndexStatus{Disk: d.ID, Ready: st.ready, Message: st.err}
		switch {
		case st.ready:
			s.Percent = 100
		case st.total > 0:
			s.Percent = int32(st.done * 100 / st.total)
		}
		out = append(out, s)
	}
	return out
}

// failed reports whether indexing a disk failed (and will not be retried
// while its domain stays here).
func (x *diskIndexer) failed(path string) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	st := x.state[path]
	return st != nil && st.err != ""
}

func (x *diskIndexer) progress(path string) func(done, total int64) {
	return func(done, total int64) {
		x.mu.Lock()
		if st := x.state[path]; st != nil {
			st.done, st.total = done, total
		}
		x.mu.Unlock()
	}
}

func (x *diskIndexer) finish(path string, err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	st := x.state[path]
	if st == nil {
		return
	}
	if err != nil {
		st.err = err.Error()
		return
	}
	st.ready = true
}

// indexLoop builds the indexes publish asks for until ctx ends, into the
// agent's cache (persisted under STATEDIR/index, where xl-send loads it
// on a Xen host).
func (a *Agent) indexLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case path := <-a.indexer.queue:
			a.indexOne(ctx, path)
		}
	}
}

func (a *Agent) indexOne(ctx context.Context, path string) {
	if a.indexes.cached(path) {
		a.indexer.finish(path, nil)
		return
	}
	metricsProgress := telemetry.indexProgress(path)
	mine := a.indexer.progress(path)
	ix, err := a.indexes.get(ctx, path, func(done, total int64) { metricsProgress(done, total); mine(done, total) })
	a.indexer.finish(path, err)
	if err != nil {
		if ctx.Err() == nil {
			a.log.Error(err, "Could not index a disk ahead of migrations; its pages will cross in full", "disk", path)
		}
		return
	}
	a.log.Info("Disk indexed ahead of migrations", "disk", path, "entries", ix.Entries())
	a.kickPublish()
}
