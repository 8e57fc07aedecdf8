package labkit

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Independent observation of simulated domains, from /proc rather than
// from anything an agent reports: the harnesses judge the product by these
// facts, so they must not come from the product. A simulated domain is a
// guest process ("xenferry-sim-guest domain=NAME", forked by its agent)
// that maps two memfds it received as fds 3 and 4: its memory and a 4 KiB
// control page (layout: pkg/xenmem/sim/ctl.go; the offsets below must
// follow it). Its stderr (fd 2) is the log its agent opened for it. This
// code reads /proc/PID/fd as root and never writes to a guest.
const (
	GuestArgv0    = "xenferry-sim-guest"
	GuestStderrFD = 2
	GuestMemFD    = 3
	GuestCtlFD    = 4
	PageSize      = 4096
	// A guest write stamps StampBytes bytes at a StampSlot-byte slot of
	// its page; the last StampSlot-StampBytes bytes of every slot are never
	// written by the workload, so they must survive any migration.
	StampSlot  = 64
	StampBytes = 48
)

// Control page layout (pkg/xenmem/sim/ctl.go).
const (
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
)

// Guest is one guest process found in /proc.
type Guest struct {
	PID int
	// Start is the process's starttime (field 22 of /proc/PID/stat): with
	// PID, its identity. 0 if the stat could not be read, i.e. the process
	// exited while it was being looked at.
	Start  uint64
	Domain string
	NetNS  uint64 // inode of its network namespace (0 if unreadable)
	Stderr string // where its fd 2 points ("" if unreadable)
}

// ID names the process unambiguously, even across pid reuse.
func (g Guest) ID() string { return fmt.Sprintf("%d@%d", g.PID, g.Start) }

// FindGuests lists the live guest processes for which keep returns true
// (every one if keep is nil). Guests that exited but are not reaped yet
// (zombies) are left out: they run no vCPU and hold no memory.
func FindGuests(keep func(Guest) bool) []Guest {
	ents, _ := os.ReadDir("/proc")
	var out []Guest
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
		if len(args) < 2 || args[0] != GuestArgv0 || !strings.HasPrefix(args[1], "domain=") {
			continue
		}
		g := Guest{PID: pid, Domain: strings.TrimPrefix(args[1], "domain=")}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil {
			fmt.Sscanf(l, "net:[%d]", &g.NetNS)
		}
		g.Stderr, _ = os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, GuestStderrFD))
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			// Fields after the command name (which may hold spaces): state is
			// field 3, starttime field 22.
			if i := bytes.LastIndexByte(st, ')'); i > 0 {
				f := strings.Fields(string(st[i+1:]))
				if len(f) > 0 && (f[0] == "Z" || f[0] == "X") {
					continue // exited, not reaped yet
				}
				if len(f) > 19 {
					g.Start, _ = strconv.ParseUint(f[19], 10, 64)
				}
			}
		}
		if keep != nil && !keep(g) {
			continue
		}
		out = append(out, g)
	}
	return out
}

// CtlView is a snapshot of a guest's control page.
type CtlView struct {
	VCPUs     int
	PauseWord uint32 // bumped by every Pause and Resume
	Paused    bool
	MemBytes  uint64
	WriteRate float64 // the workload's configured write rate
	HotStart  uint64  // first page of the hot set, the only pages written
	HotPages  uint64
	Writes    uint64 // sum over vCPUs
}

// ReadCtl reads the control page of guest process pid.
func ReadCtl(pid int) (CtlView, error) {
	b, err := ReadProcFD(pid, GuestCtlFD, 0, PageSize)
	if err != nil {
		return CtlView{}, err
	}
	if string(b[:8]) != ctlMagic {
		return CtlView{}, fmt.Errorf("guest %d: fd %d is not a control page", pid, GuestCtlFD)
	}
	le := binary.LittleEndian
	v := CtlView{
		VCPUs: int(le.Uint32(b[ctlOffVCPUs:])), PauseWord: le.Uint32(b[ctlOffPause:]), Paused: le.Uint32(b[ctlOffPause:])&1 == 1,
		MemBytes: le.Uint64(b[ctlOffMemBytes:]), HotStart: le.Uint64(b[ctlOffHotStart:]), HotPages: le.Uint64(b[ctlOffHotPages:]),
	}
	v.WriteRate = math.Float64frombits(le.Uint64(b[ctlOffWRate:]))
	for i := 0; i < v.VCPUs && i < 32; i++ {
		v.Writes += le.Uint64(b[ctlOffVCPU0+i*ctlVCPUStride+ctlVCWrites:])
	}
	return v, nil
}

// ReadProcFD reads n bytes at off of what fd of process pid refers to.
func ReadProcFD(pid, fd int, off int64, n int) ([]byte, error) {
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

// ReadMemory copies a guest's whole memory (pages not present in its
// memfd, e.g. not yet loaded by a post-copy, read as zeros).
func ReadMemory(pid int) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, GuestMemFD), &st); err != nil {
		return nil, err
	}
	return ReadProcFD(pid, GuestMemFD, 0, int(st.Size))
}
