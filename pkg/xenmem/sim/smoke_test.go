package sim

import (
	"context"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

func TestSmoke(t *testing.T) {
	dir := t.TempDir()
	h, err := NewHost(Config{Name: "h", Memory: "1Gi", CPUs: 2, StateDir: dir, Domains: []DomainSpec{{
		Name: "vm", Memory: "64Mi", VCPUs: 2, Disks: []DiskSpec{{ID: "xvda", Path: "disk.img", Size: "64Mi"}},
		Profile: Profile{Zero: 0.5, Disk: 0.3, DirtyMiBps: 10, Seed: 1},
	}}}, testr.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	d, _ := h.Domain("vm")
	time.Sleep(300 * time.Millisecond)
	t.Logf("ops %d", d.Ops())
	src, err := h.OpenSource(context.Background(), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	bm := xenmem.NewBitmap(src.NumPages())
	if err := src.ReadDirty(bm); err != nil {
		t.Fatal(err)
	}
	t.Logf("dirty %d ops %d", bm.Count(), d.Ops())
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	src.Close()
}
