//go:build linux

// Command heartbeat measures, from outside the guest, how long the lab's
// domU stood still: it reads the heartbeat the workload writes every 10 ms
// to its shared disk (hack/xenlab/workload) every 2 ms, with O_DIRECT, and
// on SIGTERM (or after -for) prints the longest time the sequence number
// did not move as JSON: {"maxGapMs":…,"gapsOver100Ms":…,"reads":…}.
//
// Reading the disk the host attaches to both lab hosts sees the guest's
// progress whichever host runs it, with a resolution of the write period
// plus a disk write (about 10-20 ms under TCG): much finer than the
// once-a-second status block, and independent of either dom0's clock.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"regexp"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

var seqRE = regexp.MustCompile(`XENLAB-HB boot=[0-9a-f]+ seq=([0-9]+)`)

func main() {
	disk := flag.String("disk", "", "the domU's shared disk image")
	dur := flag.Duration("for", 0, "stop after this long (0: at SIGTERM/SIGINT)")
	flag.Parse()
	if *disk == "" {
		fmt.Fprintln(os.Stderr, "usage: heartbeat -disk FILE [-for DURATION]")
		os.Exit(2)
	}
	fd, err := unix.Open(*disk, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "heartbeat: open %s: %v\n", *disk, err)
		os.Exit(1)
	}
	defer unix.Close(fd)
	buf := aligned(4096)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	var deadline <-chan time.Time
	if *dur > 0 {
		deadline = time.After(*dur)
	}
	var last string
	var lastChange time.Time
	var maxGap time.Duration
	over, reads := 0, 0
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
		case <-deadline:
		case <-tick.C:
			if _, err := unix.Pread(fd, buf, 4096); err != nil {
				continue
			}
			reads++
			m := seqRE.FindSubmatch(buf)
			if m == nil {
				continue
			}
			now := time.Now()
			if s := string(m[1]); s != last {
				if !lastChange.IsZero() {
					g := now.Sub(lastChange)
					if g > maxGap {
						maxGap = g
					}
					if g > 100*time.Millisecond {
						over++
					}
				}
				last, lastChange = s, now
			}
			continue
		}
		break
	}
	b, _ := json.Marshal(map[string]any{"maxGapMs": maxGap.Milliseconds(), "gapsOver100Ms": over, "reads": reads})
	fmt.Println(string(b))
}

// aligned returns n bytes aligned for O_DIRECT.
func aligned(n int) []byte {
	b := make([]byte, n+4096)
	off := int(4096 - uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off : off+n]
}
