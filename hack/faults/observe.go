package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Independent observation of simulated domains, from /proc rather than from
// anything an agent reports. A simulated domain is a guest process
// ("xenferry-sim-guest domain=NAME", forked by its agent, in the agent's
// network namespace) that maps two memfds it received as fds 3 and 4: its
// memory and a 4 KiB control page (layout: pkg/xenmem/sim/ctl.go). This
// program reads both through /proc/PID/fd as root, never writing.
const (
	guestArgv0     = "xenferry-sim-guest"
	guestMemFD     = 3
	guestCtlFD     = 4
	ctlMagic       = "XFSIMCTL"
	ctlOffVCPUs    = 8
	ctlOffPause    = 12 // odd: the vCPUs are parked (paused)
	ctlOffMemBytes = 16
	ctlOffWRate    = 24
	ctlOffHotStart = 40
	ctlOffHotPages = 48
	ctlOffVCPU0    = 128
	ctlVCPUStride  = 64
	ctlVCWrites    = 16
	pageSize       = 4096
	// A guest write stamps 48 bytes at a 64-byte slot of its page; the last
	// 16 bytes of every slot are never written by the workload.
	stampSlot  = 64
	stampBytes = 48
)

// guest is one guest process found in /proc.
type guest struct {
	pid    int
	start  uint64 // starttime from /proc/PID/stat: with pid, the process identity
	domain string
	netns  uint64
}

func (g guest) id() string { return fmt.Sprintf("%d@%d", g.pid, g.start) }

// findGuests lists the guest processes of domain (every domain if "") in
// the namespace with inode ns (any namespace if 0).
func findGuests(domain string, ns uint64) []guest {
	ents, _ := os.ReadDir("/proc")
	var out []guest
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cl), "\x00"), "\x00")
		if len(args) < 2 || args[0] != guestArgv0 || !strings.HasPrefix(args[1], "domain=") {
			continue
		}
		g := guest{pid: pid, domain: strings.TrimPrefix(args[1], "domain=")}
		if domain != "" && g.domain != domain {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil {
			fmt.Sscanf(l, "net:[%d]", &g.netns)
		}
		if ns != 0 && g.netns != ns {
			continue
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			// Fields after the command name (which may hold spaces): state is
			// field 3, starttime field 22.
			if i := bytes.LastIndexByte(st, ')'); i > 0 {
				f := strings.Fields(string(st[i+1:]))
				if len(f) > 19 {
					g.start, _ = strconv.ParseUint(f[19], 10, 64)
				}
				if len(f) > 0 && (f[0] == "Z" || f[0] == "X") {
					continue // exited, not reaped yet
				}
			}
		}
		out = append(out, g)
	}
	return out
}

// ctlView is a snapshot of a guest's control page.
type ctlView struct {
	vcpus     int
	pauseWord uint32 // bumped by every Pause and Resume
	paused    bool
	memBytes  uint64
	writeRate float64
	hotStart  uint64
	hotPages  uint64
	writes    uint64 // sum over vCPUs
}

func readCtl(pid int) (ctlView, error) {
	b, err := readProcFD(pid, guestCtlFD, 0, pageSize)
	if err != nil {
		return ctlView{}, err
	}
	if string(b[:8]) != ctlMagic {
		return ctlView{}, fmt.Errorf("guest %d: fd %d is not a control page", pid, guestCtlFD)
	}
	le := binary.LittleEndian
	v := ctlView{
		vcpus: int(le.Uint32(b[ctlOffVCPUs:])), pauseWord: le.Uint32(b[ctlOffPause:]), paused: le.Uint32(b[ctlOffPause:])&1 == 1,
		memBytes: le.Uint64(b[ctlOffMemBytes:]), hotStart: le.Uint64(b[ctlOffHotStart:]), hotPages: le.Uint64(b[ctlOffHotPages:]),
	}
	v.writeRate = math.Float64frombits(le.Uint64(b[ctlOffWRate:]))
	for i := 0; i < v.vcpus && i < 32; i++ {
		v.writes += le.Uint64(b[ctlOffVCPU0+i*ctlVCPUStride+ctlVCWrites:])
	}
	return v, nil
}

func readProcFD(pid, fd int, off int64, n int) ([]byte, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		return nil, fmt.Errorf("guest %d fd %d: %w", pid, fd, err)
	}
	return b, nil
}

// runState says whether a guest runs (its vCPUs are not parked: it was
// resumed and never paused again) and whether it makes progress (when its
// workload writes, its write counters advance over the interval). A guest
// that runs without progress is stalled, e.g. its vCPUs wait for pages a
// post-copy never delivers.
type runState struct {
	running     bool
	progressing bool
	ctl         ctlView
}

func observeRun(pid int, interval time.Duration) (runState, error) {
	a, err := readCtl(pid)
	if err != nil {
		return runState{}, err
	}
	time.Sleep(interval)
	b, err := readCtl(pid)
	if err != nil {
		return runState{}, err
	}
	rs := runState{ctl: b, running: !a.paused && !b.paused}
	rs.progressing = rs.running && (b.writeRate == 0 || b.writes > a.writes)
	return rs, nil
}

// readMemory copies a guest's whole memory (pages not present in its
// memfd, e.g. not yet loaded by a post-copy, read as zeros).
func readMemory(pid int) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, guestMemFD), &st); err != nil {
		return nil, err
	}
	return readProcFD(pid, guestMemFD, 0, int(st.Size))
}

// wrongPages compares a domain copy with its content before the migration.
// The workload writes only the hot set (hotWriteShare 1), so every other
// page must be byte-identical to the original whatever happened since; in
// hot pages the 16 bytes at the end of each 64-byte slot are never written
// by the guest and must be identical too.
func wrongPages(orig, now []byte, hotStart, hotPages uint64) (int, []uint64) {
	if len(orig) != len(now) {
		return len(orig) / pageSize, nil
	}
	n := 0
	var first []uint64
	for p := uint64(0); p < uint64(len(orig)/pageSize); p++ {
		a, b := orig[p*pageSize:(p+1)*pageSize], now[p*pageSize:(p+1)*pageSize]
		bad := false
		if p >= hotStart && p < hotStart+hotPages {
			for s := 0; s < pageSize && !bad; s += stampSlot {
				bad = !bytes.Equal(a[s+stampBytes:s+stampSlot], b[s+stampBytes:s+stampSlot])
			}
		} else {
			bad = !bytes.Equal(a, b)
		}
		if bad {
			n++
			if len(first) < 5 {
				first = append(first, p)
			}
		}
	}
	return n, first
}

// agentRSS is the resident set of a process in MiB (0 if gone).
func agentRSS(pid int) int64 {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			if len(f) >= 2 {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				return kb >> 10
			}
		}
	}
	return 0
}
