package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/dedup"
)

// Independent observation of simulated domains, from /proc rather than
// from anything an agent reports (hack/faults/observe.go has the same
// facts; this copy adds where a guest lives without network namespaces).
// A simulated domain is a guest process ("xenferry-sim-guest
// domain=NAME") that maps two memfds it received as fds 3 and 4: its
// memory and a 4 KiB control page (layout: pkg/xenmem/sim/ctl.go). A guest
// of an agent with a state dir writes its stderr to
// STATE/sim/guests/NAME.log: fd 2 says which host's agent created it, even
// after that agent is gone or the log was removed. This program reads
// /proc as root, never writing to a guest.
const (
	guestArgv0     = "xenferry-sim-guest"
	guestStderrFD  = 2
	guestMemFD     = 3
	guestCtlFD     = 4
	ctlMagic       = "XFSIMCTL"
	ctlOffVCPUs    = 8
	ctlOffPause    = 12 // odd: the vCPUs are parked (paused)
	ctlOffMemBytes = 16
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
	start  uint64 // starttime (field 22 of /proc/PID/stat): with pid, the identity
	domain string
	stderr string // where fd 2 points
}

func (g guest) id() string { return fmt.Sprintf("%d@%d", g.pid, g.start) }

// findGuests lists every live guest process whose stderr is under dir (every
// guest if dir is "").
func findGuests(dir string) []guest {
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
		g.stderr, _ = os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, guestStderrFD))
		if dir != "" && !strings.HasPrefix(g.stderr, dir+string(filepath.Separator)) {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		if i := bytes.LastIndexByte(st, ')'); i > 0 {
			f := strings.Fields(string(st[i+1:]))
			if len(f) > 0 && (f[0] == "Z" || f[0] == "X") {
				continue // exited, not reaped yet
			}
			if len(f) > 19 {
				g.start, _ = strconv.ParseUint(f[19], 10, 64)
			}
		}
		out = append(out, g)
	}
	return out
}

// killGuest ends a guest process (cleanup of guests no agent destroyed).
func killGuest(g guest) {
	_ = syscall.Kill(g.pid, syscall.SIGKILL)
}

// ctlView is a snapshot of a guest's control page.
type ctlView struct {
	vcpus    int
	paused   bool
	memBytes uint64
	hotStart uint64
	hotPages uint64
	writes   uint64 // sum over vCPUs
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
		vcpus: int(le.Uint32(b[ctlOffVCPUs:])), paused: le.Uint32(b[ctlOffPause:])&1 == 1,
		memBytes: le.Uint64(b[ctlOffMemBytes:]), hotStart: le.Uint64(b[ctlOffHotStart:]), hotPages: le.Uint64(b[ctlOffHotPages:]),
	}
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

// readMemory copies a guest's whole memory (pages not present in its
// memfd, e.g. not yet loaded by a post-copy, read as zeros).
func readMemory(pid int) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, guestMemFD), &st); err != nil {
		return nil, err
	}
	return readProcFD(pid, guestMemFD, 0, int(st.Size))
}

// fingerprint is what must never change in a domain's memory, whatever
// moves it: the workload writes only the hot set (hotWriteShare 1), so every
// other page stays byte-identical, and in hot pages the last 16 bytes of
// each 64-byte slot are never written. One hash per page of those bytes.
type fingerprint struct {
	memBytes           uint64
	hotStart, hotPages uint64
	pages              []dedup.Hash
}

func takeFingerprint(mem []byte, c ctlView) fingerprint {
	fp := fingerprint{memBytes: uint64(len(mem)), hotStart: c.hotStart, hotPages: c.hotPages,
		pages: make([]dedup.Hash, len(mem)/pageSize)}
	tails := make([]byte, pageSize)
	for p := range fp.pages {
		page := mem[p*pageSize : (p+1)*pageSize]
		if uint64(p) >= c.hotStart && uint64(p) < c.hotStart+c.hotPages {
			clear(tails)
			for s := 0; s < pageSize; s += stampSlot {
				copy(tails[s:s+stampSlot-stampBytes], page[s+stampBytes:s+stampSlot])
			}
			page = tails
		}
		fp.pages[p] = dedup.HashPage(page)
	}
	return fp
}

// wrongPages counts the pages of mem that differ from the fingerprint
// (every page, if the size differs), and the first few of them.
func (fp fingerprint) wrongPages(mem []byte, c ctlView) (int, []int) {
	if uint64(len(mem)) != fp.memBytes || c.hotStart != fp.hotStart || c.hotPages != fp.hotPages {
		return len(fp.pages), nil
	}
	now := takeFingerprint(mem, c)
	n := 0
	var first []int
	for p := range fp.pages {
		if now.pages[p] != fp.pages[p] {
			n++
			if len(first) < 5 {
				first = append(first, p)
			}
		}
	}
	return n, first
}

// regEntry is the part of a sim host's registry (STATE/sim/host.json,
// pkg/xenmem/sim/registry.go) this program reads: what the host's
// hypervisor knows of its domains.
type regEntry struct {
	Name     string `json:"name"`
	PID      int    `json:"pid"`
	PIDStart uint64 `json:"pidStart"`
	State    string `json:"state"`
}

func readRegistry(stateDir string) ([]regEntry, error) {
	raw, err := os.ReadFile(filepath.Join(stateDir, "sim", "host.json"))
	if err != nil {
		return nil, err
	}
	var reg struct {
		Domains []regEntry `json:"domains"`
	}
	if err := json.Unmarshal(raw, &reg); err != nil {
		return nil, fmt.Errorf("registry of %s: %w", stateDir, err)
	}
	return reg.Domains, nil
}
