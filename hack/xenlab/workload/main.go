//go:build linux

// Command workload is /init of the xenlab domU: a verifiable guest state for
// migration tests. It
//   - keeps PatternMiB of memory filled with a pattern derived from its boot
//     id and re-checks all of it every few seconds (bad pages are counted),
//   - reads CacheMiB of its disk into the page cache, so that many guest
//     pages equal blocks of the shared disk (what dedup finds),
//   - writes once a second, with O_DIRECT, a status block to sector 0 of its
//     disk: boot id, a counter that only ever increases, checks done and bad;
//   - writes every 10 ms a heartbeat (a sequence number) to the next page.
//
// After a migration the status block must show the same boot id, a counter
// that kept increasing and bad=0: the domU did not reboot, its memory is
// intact and its disk keeps working on the new host.
package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	disk     = "/dev/xvda"
	cacheOff = 1 << 20 // the disk's data region starts at 1 MiB
	// heartbeatOff is the heartbeat block, after the status block.
	heartbeatOff = 4096
	pageSize     = 4096
)

// Sizes, from the kernel command line (xenlab.pattern=MiB xenlab.cache=MiB).
var patternMiB, cacheMiB = 16, 40

func main() {
	_ = unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	_ = unix.Mount("proc", "/proc", "proc", 0, "")
	con, err := os.OpenFile("/dev/hvc0", os.O_WRONLY, 0)
	if err != nil {
		con = os.Stdout
	}
	logf := func(format string, a ...any) { fmt.Fprintf(con, "workload: "+format+"\n", a...) }
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		for _, f := range strings.Fields(string(b)) {
			k, v, _ := strings.Cut(f, "=")
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				continue
			}
			switch k {
			case "xenlab.pattern":
				patternMiB = n
			case "xenlab.cache":
				cacheMiB = n
			}
		}
	}
	if err := loadModule("/xen-blkfront.ko"); err != nil {
		logf("load xen-blkfront: %v", err)
	}
	var boot uint64
	var tv unix.Timeval
	_ = unix.Gettimeofday(&tv)
	boot = uint64(tv.Sec)<<20 ^ uint64(tv.Usec) | 1

	mem := make([]byte, patternMiB<<20)
	fill(mem, boot)

	var f *os.File
	for i := 0; i < 100; i++ {
		if f, err = os.OpenFile(disk, os.O_RDWR|syscall.O_DIRECT|syscall.O_SYNC, 0); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		logf("open %s: %v", disk, err)
	}
	// Page-cache the data region through a buffered descriptor.
	if c, err := os.Open(disk); err == nil {
		buf := make([]byte, 1<<20)
		for i := 0; i < cacheMiB; i++ {
			if _, err := c.ReadAt(buf, cacheOff+int64(i)<<20); err != nil {
				logf("cache read: %v", err)
				break
			}
		}
		// Kept open so the cached pages stay associated with a user.
		defer c.Close()
	}
	logf("started boot=%016x pattern=%dMiB cache=%dMiB", boot, patternMiB, cacheMiB)

	// The heartbeat: a sequence number in the disk's second page, written
	// every 10 ms, that the lab reads from outside (hack/xenlab/heartbeat)
	// to measure how long the domU stood still during a migration.
	if f != nil {
		go func() {
			hb := alignedBlock()
			for seq := uint64(1); ; seq++ {
				clear(hb)
				copy(hb, fmt.Sprintf("XENLAB-HB boot=%016x seq=%d\n", boot, seq))
				_, _ = f.WriteAt(hb, heartbeatOff)
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}

	blk := alignedBlock()
	var counter, checks, bad uint64
	last := time.Now()
	for {
		time.Sleep(time.Second)
		counter++
		if counter%5 == 0 && len(mem) > 0 {
			bad += check(mem, boot)
			checks++
		}
		status := fmt.Sprintf("XENLAB-STATUS boot=%016x counter=%d checks=%d bad=%d\n", boot, counter, checks, bad)
		if f != nil {
			clear(blk)
			copy(blk, status)
			if _, err := f.WriteAt(blk, 0); err != nil {
				logf("status write: %v", err)
			}
		}
		if time.Since(last) >= 30*time.Second {
			logf("%s", strings.TrimSpace(status))
			last = time.Now()
		}
	}
}

// fill writes the pattern of boot into mem: one 64-bit xorshift word per
// 8 bytes, seeded per page, so no two pages are equal and none is zero.
func fill(mem []byte, boot uint64) {
	for p := 0; p < len(mem)/pageSize; p++ {
		x := boot ^ uint64(p+1)*0x9E3779B97F4A7C15
		pg := mem[p*pageSize : (p+1)*pageSize]
		for i := 0; i < pageSize; i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			*(*uint64)(unsafe.Pointer(&pg[i])) = x
		}
	}
}

// check returns the number of pages of mem that differ from the pattern.
func check(mem []byte, boot uint64) (bad uint64) {
	want := make([]byte, pageSize)
	for p := 0; p < len(mem)/pageSize; p++ {
		x := boot ^ uint64(p+1)*0x9E3779B97F4A7C15
		for i := 0; i < pageSize; i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			*(*uint64)(unsafe.Pointer(&want[i])) = x
		}
		if string(want) != string(mem[p*pageSize:(p+1)*pageSize]) {
			bad++
		}
	}
	return bad
}

func alignedBlock() []byte {
	b := make([]byte, 2*pageSize)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (pageSize - 1))
	if off != 0 {
		off = pageSize - off
	}
	return b[off : off+pageSize]
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}
