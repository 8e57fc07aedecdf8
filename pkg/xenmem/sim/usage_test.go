package sim

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

func TestParseProcStat(t *testing.T) {
	// A guest's /proc/PID/stat, its command name with a space and a paren.
	line := "4242 (node agent) x) S 1 4242 4242 0 -1 4194560 120 0 0 0 250 37 0 0 20 0 3 0 987654 1000 100 18446744073709551615\n"
	cpu, start, err := parseProcStat(line)
	if err != nil {
		t.Fatalf("parseProcStat: %v", err)
	}
	if cpu != 2870*time.Millisecond || start != 987654 {
		t.Errorf("got cpu %v start %d, want 2.87s (287 ticks) and 987654", cpu, start)
	}
	for _, bad := range []string{"", "4242 (x) S 1 2 3", "4242 (x) S 1 4242 4242 0 -1 4194560 120 0 0 0 a b 0 0 20 0 3 0 9 1 1 1"} {
		if _, _, err := parseProcStat(bad); err == nil {
			t.Errorf("parseProcStat(%q): no error", bad)
		}
	}
}

func TestDomainsReportCPUTimeAndWrites(t *testing.T) {
	h := newTestHost(t,
		DomainSpec{Name: "busy", Memory: "8Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 64}},
		DomainSpec{Name: "zero", Memory: "8Mi", VCPUs: 1, Profile: Profile{Zero: 1}})
	ctx := context.Background()
	deadline := time.Now().Add(20 * time.Second)
	for {
		doms, err := h.Domains(ctx)
		if err != nil {
			t.Fatalf("Domains: %v", err)
		}
		busy := doms[0]
		if busy.Name != "busy" {
			t.Fatalf("first domain %s, want busy", busy.Name)
		}
		if busy.CPUTime >= 100*time.Millisecond && busy.PageWrites > 0 {
			t.Logf("busy: cpu %v, %d page writes; zero: cpu %v, %d writes", busy.CPUTime, busy.PageWrites, doms[1].CPUTime, doms[1].PageWrites)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("busy domain: cpu %v, %d page writes after 20s: want CPU time from its guest process and writes", busy.CPUTime, busy.PageWrites)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestPeekPagesLeavesTheDomainFree(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "4Mi", VCPUs: 1, Profile: Profile{Zero: 1}})
	ctx := context.Background()
	buf := make([]byte, 16*xenmem.PageSize)
	for i := range buf {
		buf[i] = 0xff
	}
	if err := h.PeekPages(ctx, "vm", 1008, buf); err != nil {
		t.Fatalf("PeekPages: %v", err)
	}
	if !bytes.Equal(buf, make([]byte, len(buf))) {
		t.Errorf("a zero-profile domain's pages do not read as zero")
	}
	sd, err := h.OpenSource(ctx, "vm")
	if err != nil {
		t.Fatalf("OpenSource after a peek: %v", err)
	}
	if err := h.PeekPages(ctx, "vm", 0, buf); err != nil {
		t.Errorf("PeekPages while a source handle is open: %v", err)
	}
	sd.Close()
	if err := h.PeekPages(ctx, "vm", 1020, buf); err == nil {
		t.Errorf("PeekPages past the end: no error")
	}
	if err := h.PeekPages(ctx, "nope", 0, buf); !errors.Is(err, xenmem.ErrNoDomain) {
		t.Errorf("PeekPages of a missing domain: %v, want ErrNoDomain", err)
	}
}
