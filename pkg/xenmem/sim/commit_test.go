package sim

import (
	"errors"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// progresses reports whether the domain's workload makes progress within
// a short window (it runs), as opposed to standing still (paused).
func progresses(d *Domain) bool {
	ops := d.Ops()
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if d.Ops() != ops {
			return true
		}
	}
	return false
}

// TestCommittedSourceNeverResumes: after Commit, neither Resume, nor Close,
// nor a second handle, nor the domain's own Resume runs the domain here;
// the domain stays paused and listed until a verdict resolves it.
func TestCommittedSourceNeverResumes(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "16Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 10, Seed: 1}})
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Commit(); err == nil {
		t.Fatal("Commit of a running domain succeeded")
	}
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := src.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := src.Commit(); err != nil {
		t.Fatalf("second Commit on the same handle: %v", err)
	}
	if err := src.Resume(); !errors.Is(err, xenmem.ErrCommitted) {
		t.Fatalf("Resume after Commit = %v, want ErrCommitted", err)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	d := mustDomain(t, h, "vm")
	if !d.Paused() || progresses(d) {
		t.Fatal("Close resumed a committed domain: it would run on both hosts")
	}
	if st := d.Info().State; st != xenmem.StatePaused {
		t.Fatalf("state after Close = %s, want Paused", st)
	}
	if err := d.Resume(); !errors.Is(err, xenmem.ErrCommitted) {
		t.Fatalf("Domain.Resume of a committed domain = %v, want ErrCommitted", err)
	}
	if d.dirtyOn {
		t.Fatal("Close left dirty logging on")
	}
	// A later handle (a second migration, a restarted agent) cannot commit
	// it to another destination, nor resume it.
	src2, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src2.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := src2.Commit(); !errors.Is(err, xenmem.ErrCommitted) {
		t.Fatalf("Commit of a domain committed by an earlier handle = %v, want ErrCommitted", err)
	}
	if err := src2.Resume(); !errors.Is(err, xenmem.ErrCommitted) {
		t.Fatalf("Resume through a later handle = %v, want ErrCommitted", err)
	}
	if err := src2.Close(); err != nil {
		t.Fatal(err)
	}
	if progresses(d) {
		t.Fatal("a later handle's Close resumed a committed domain")
	}
	// The verdict "the destination destroyed its copy" resolves it.
	src3, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src3.Reclaim("test: destination discarded"); err != nil {
		t.Fatal(err)
	}
	if err := src3.Release(); err == nil {
		t.Fatal("Release of a reclaimed domain succeeded")
	}
	src3.Close()
	if d.Committed() || !progresses(d) {
		t.Fatal("the reclaimed domain does not run here")
	}
}

// TestReclaimResumesAndCloseKeepsRunning: Reclaim resumes a committed
// domain through the handle that committed it; Close then leaves it
// running; a Reclaim of a domain never committed is refused.
func TestReclaimResumesAndCloseKeepsRunning(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "16Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 10, Seed: 2}})
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Reclaim("nothing to reclaim"); err == nil {
		t.Fatal("Reclaim of a domain never committed succeeded")
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := src.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := src.Reclaim("test"); err != nil {
		t.Fatal(err)
	}
	d := mustDomain(t, h, "vm")
	if !progresses(d) {
		t.Fatal("Reclaim did not resume the domain")
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if st := d.Info().State; st != xenmem.StateRunning || !progresses(d) {
		t.Fatalf("after Reclaim and Close: state %s, running %v", st, progresses(d))
	}
}

// TestReleaseAfterCommit: the normal end: the destination verified, the
// source destroys its committed copy.
func TestReleaseAfterCommit(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "16Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 10, Seed: 3}})
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := src.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := src.Release(); err != nil {
		t.Fatal(err)
	}
	if err := src.Reclaim("too late"); !errors.Is(err, xenmem.ErrNoDomain) {
		t.Fatalf("Reclaim after Release = %v, want ErrNoDomain", err)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.Domain("vm"); ok {
		t.Fatal("released domain still listed")
	}
}
