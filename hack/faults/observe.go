package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// Guests are observed from /proc through labkit (see labkit.FindGuests):
// here a domain's guests are attributed to a host by the network
// namespace they live in, the namespace of the agent that forked them.

// findGuests lists the guest processes of domain (every domain if "") in
// the namespace with inode ns (any namespace if 0).
func findGuests(domain string, ns uint64) []labkit.Guest {
	return labkit.FindGuests(func(g labkit.Guest) bool {
		return (domain == "" || g.Domain == domain) && (ns == 0 || g.NetNS == ns)
	})
}

// runState says whether a guest runs (its vCPUs are not parked: it was
// resumed and never paused again) and whether it makes progress (when its
// workload writes, its write counters advance over the interval). A guest
// that runs without progress is stalled, e.g. its vCPUs wait for pages a
// post-copy never delivers.
type runState struct {
	running     bool
	progressing bool
	ctl         labkit.CtlView
}

func observeRun(pid int, interval time.Duration) (runState, error) {
	a, err := labkit.ReadCtl(pid)
	if err != nil {
		return runState{}, err
	}
	time.Sleep(interval)
	b, err := labkit.ReadCtl(pid)
	if err != nil {
		return runState{}, err
	}
	rs := runState{ctl: b, running: !a.Paused && !b.Paused}
	rs.progressing = rs.running && (b.WriteRate == 0 || b.Writes > a.Writes)
	return rs, nil
}

// wrongPages compares a domain copy with its content before the migration.
// The workload writes only the hot set (hotWriteShare 1), so every other
// page must be byte-identical to the original whatever happened since; in
// hot pages the 16 bytes at the end of each 64-byte slot are never written
// by the guest and must be identical too.
func wrongPages(orig, now []byte, hotStart, hotPages uint64) (int, []uint64) {
	if len(orig) != len(now) {
		return len(orig) / labkit.PageSize, nil
	}
	n := 0
	var first []uint64
	for p := uint64(0); p < uint64(len(orig)/labkit.PageSize); p++ {
		a, b := orig[p*labkit.PageSize:(p+1)*labkit.PageSize], now[p*labkit.PageSize:(p+1)*labkit.PageSize]
		bad := false
		if p >= hotStart && p < hotStart+hotPages {
			for s := 0; s < labkit.PageSize && !bad; s += labkit.StampSlot {
				bad = !bytes.Equal(a[s+labkit.StampBytes:s+labkit.StampSlot], b[s+labkit.StampBytes:s+labkit.StampSlot])
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
