package sim

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// clockTicks is the unit of utime and stime in /proc/PID/stat: USER_HZ,
// which is 100 on every Linux ABI Go supports (sysconf(_SC_CLK_TCK) would
// need cgo to ask).
const clockTicks = 100

// cpuTime is the CPU the guest process used so far (its vCPU threads and
// their helpers: user + system time of the whole thread group), or 0 when
// the process is gone or is no longer the one this domain started.
func (d *Domain) cpuTime() time.Duration {
	d.mu.Lock()
	g, destroyed := d.guest, d.destroyed
	d.mu.Unlock()
	if g == nil || destroyed || g.pid <= 0 {
		return 0
	}
	t, start, err := procCPUTime(g.pid)
	if err != nil || g.start != 0 && start != g.start {
		return 0
	}
	return t
}

// procCPUTime reads utime+stime (fields 14 and 15) and the start time
// (field 22) of a process from /proc/PID/stat.
func procCPUTime(pid int) (time.Duration, uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	return parseProcStat(string(raw))
}

func parseProcStat(s string) (time.Duration, uint64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("proc stat: no command name")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): field n is f[n-3].
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("proc stat: %d fields", len(f)+2)
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	start, err3 := strconv.ParseUint(f[19], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil {
		return 0, 0, fmt.Errorf("proc stat: utime %q stime %q starttime %q", f[11], f[12], f[19])
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, start, nil
}

// PeekPages reads guest memory through the memory file, without a
// migration handle: the domain stays free for OpenSource meanwhile.
func (h *Host) PeekPages(_ context.Context, name string, first uint64, dst []byte) error {
	d, ok := h.Domain(name)
	if !ok {
		return fmt.Errorf("peek %s: %w", name, xenmem.ErrNoDomain)
	}
	n := uint64(len(dst)) / xenmem.PageSize
	if uint64(len(dst))%xenmem.PageSize != 0 || first >= d.npages || n > d.npages-first {
		return fmt.Errorf("peek %s: %d bytes at pfn %d of %d pages", name, len(dst), first, d.npages)
	}
	if d.isDestroyed() {
		return fmt.Errorf("peek %s: %w", name, xenmem.ErrNoDomain)
	}
	// A concurrent destroy closes the file: ReadAt then fails (os.File
	// guards its descriptor), it never reads another file.
	if _, err := d.memFile.ReadAt(dst, int64(first*xenmem.PageSize)); err != nil {
		if d.isDestroyed() {
			return fmt.Errorf("peek %s: %w", name, xenmem.ErrNoDomain)
		}
		return fmt.Errorf("peek %s at pfn %d: %w", name, first, err)
	}
	return nil
}

var _ xenmem.MemoryPeeker = (*Host)(nil)
