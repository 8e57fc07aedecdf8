package postcopy

import (
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
)

// RealtimePriority is the SCHED_FIFO priority PinRealtime gives the
// threads that serve post-copy faults (1-99; 0 leaves them in the normal
// class). A vCPU waiting on a missing page waits for these threads; on a
// host whose cores are busy with the push, the guests and everything
// else, a thread of the normal class that the kernel woke still waits for
// a core (docs/benchmarks.md, "Fault latency").
var RealtimePriority atomic.Int32

func init() { RealtimePriority.Store(10) }

var refusedOnce sync.Once

// PinRealtime locks the calling goroutine to its OS thread and makes the
// thread SCHED_FIFO at RealtimePriority, so that the kernel runs it as
// soon as what it waits for (a fault, a socket) is there, ahead of the
// push and the guests. The caller must block in system calls between
// bursts of work (a FIFO thread that spins starves its core) and must
// never unlock the thread: when the goroutine returns the runtime ends
// the thread, so no real-time thread goes back to its pool. Where the
// kernel refuses (no CAP_SYS_NICE, RLIMIT_RTPRIO, a cgroup without
// real-time budget) the thread stays locked in the normal class and the
// reason is logged once. It reports whether the thread is real-time.
func PinRealtime(log logr.Logger, what string) bool {
	runtime.LockOSThread()
	prio := RealtimePriority.Load()
	if prio <= 0 {
		return false
	}
	attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: uint32(min(prio, 99))}
	if err := unix.SchedSetAttr(0, &attr, 0); err != nil {
		refusedOnce.Do(func() {
			log.Info("Post-copy fault threads stay in the normal scheduling class: SCHED_FIFO refused", "thread", what, "priority", prio, "error", err.Error())
		})
		return false
	}
	return true
}
