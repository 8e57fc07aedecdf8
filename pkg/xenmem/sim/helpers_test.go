package sim

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/go-logr/logr"
	"github.com/xenferry/xenferry/internal/testlog"
	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// requiresUffd skips a test when this process cannot create a userfaultfd
// with the features the guest needs (kernel too old, or userfaultfd denied).
func requiresUffd(t testing.TB) {
	t.Helper()
	fd, err := newUserfaultfd()
	if err != nil {
		t.Skipf("userfaultfd with shmem write-protect is not available here (needs Linux 6.7+, root or vm.unprivileged_userfaultfd=1 for older kernels): %v", err)
	}
	unix.Close(fd)
}

// newTestHost starts a host with the given domains; it is closed when the
// test ends.
func newTestHost(t testing.TB, domains ...DomainSpec) *Host {
	t.Helper()
	dir := t.TempDir()
	log := logr.Discard()
	if tt, ok := t.(*testing.T); ok {
		log = testlog.New(tt)
	}
	h, err := NewHost(Config{Name: "test", Memory: "4Gi", CPUs: 2, StateDir: dir, Domains: domains}, log)
	if err != nil {
		t.Fatalf("NewHost: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func mustDomain(t testing.TB, h *Host, name string) *Domain {
	t.Helper()
	d, ok := h.Domain(name)
	if !ok {
		t.Fatalf("domain %s not found", name)
	}
	return d
}

func page(mem []byte, pfn uint64) []byte {
	return mem[pfn*xenmem.PageSize : (pfn+1)*xenmem.PageSize]
}

// diskIndex hashes every 4 KiB block of a disk image (test helper only).
func diskIndex(t testing.TB, path string) map[uint64]bool {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	idx := make(map[uint64]bool, len(raw)/xenmem.PageSize)
	for off := 0; off+xenmem.PageSize <= len(raw); off += xenmem.PageSize {
		idx[fnv64(raw[off:off+xenmem.PageSize])] = true
	}
	return idx
}

var zeroPage = make([]byte, xenmem.PageSize)

func isZeroPage(p []byte) bool { return bytes.Equal(p, zeroPage) }

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return ctx
}

func writeFile(t testing.TB, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
