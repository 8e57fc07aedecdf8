package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/xenferry/xenferry/hack/internal/labkit"
	"github.com/xenferry/xenferry/pkg/dedup"
)

// Guests are observed from /proc through labkit (see labkit.FindGuests).
// Without network namespaces, a guest is attributed to a host by its
// stderr: a guest of an agent with a state dir writes it to
// STATE/sim/guests/NAME.log, so fd 2 says which host's agent created it,
// even after that agent is gone or the log was removed.

// findGuests lists every live guest process whose stderr is under dir (every
// guest if dir is ""). A guest whose stat could not be read (Start 0) has
// exited meanwhile and is left out.
func findGuests(dir string) []labkit.Guest {
	return labkit.FindGuests(func(g labkit.Guest) bool {
		return g.Start != 0 && (dir == "" || strings.HasPrefix(g.Stderr, dir+string(filepath.Separator)))
	})
}

// killGuest ends a guest process (cleanup of guests no agent destroyed).
func killGuest(g labkit.Guest) {
	_ = syscall.Kill(g.PID, syscall.SIGKILL)
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

func takeFingerprint(mem []byte, c labkit.CtlView) fingerprint {
	fp := fingerprint{memBytes: uint64(len(mem)), hotStart: c.HotStart, hotPages: c.HotPages,
		pages: make([]dedup.Hash, len(mem)/labkit.PageSize)}
	tails := make([]byte, labkit.PageSize)
	for p := range fp.pages {
		page := mem[p*labkit.PageSize : (p+1)*labkit.PageSize]
		if uint64(p) >= c.HotStart && uint64(p) < c.HotStart+c.HotPages {
			clear(tails)
			for s := 0; s < labkit.PageSize; s += labkit.StampSlot {
				copy(tails[s:s+labkit.StampSlot-labkit.StampBytes], page[s+labkit.StampBytes:s+labkit.StampSlot])
			}
			page = tails
		}
		fp.pages[p] = dedup.HashPage(page)
	}
	return fp
}

// wrongPages counts the pages of mem that differ from the fingerprint
// (every page, if the size differs), and the first few of them.
func (fp fingerprint) wrongPages(mem []byte, c labkit.CtlView) (int, []int) {
	if uint64(len(mem)) != fp.memBytes || c.HotStart != fp.hotStart || c.HotPages != fp.hotPages {
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
