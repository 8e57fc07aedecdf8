package engine_test

import (
	"encoding/json"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// TestDuplicateWaitsForItsWinner: in post-copy one page can arrive on two
// paths, e.g. a demand answer on the priority connection and the push on a
// data stream. Whichever installs it first (the winner) records its hash;
// the other finds it present (a duplicate). The page counts as here only
// once the winner has recorded the hash: a duplicate that lands while the
// winner is between its install and that record must not let the session
// check the manifest, which would then see no hash for the page, call a
// good copy corrupt and destroy it.
func TestDuplicateWaitsForItsWinner(t *testing.T) {
	e := newEnv(t, nil)
	const pfn = 7
	held, release := make(chan struct{}), make(chan struct{})
	var holdOnce, releaseOnce sync.Once
	letGo := func() { releaseOnce.Do(func() { close(release) }) }
	defer engine.SetTestAfterInstall(func(prio bool, pfns []uint64) {
		if !prio || !slices.Contains(pfns, pfn) {
			return
		}
		holdOnce.Do(func() { close(held) })
		select {
		case <-release:
		case <-time.After(30 * time.Second):
		}
	})()
	defer letGo()

	_, dom := e.domain("dup", "16Mi", sim.Profile{Seed: 5})
	if err := dom.Pause(); err != nil {
		t.Fatal(err)
	}
	state, err := dom.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	info := dom.Info()
	n := info.MemoryBytes / xenmem.PageSize
	s := openRaw(t, e.addr, "dup", info, wire.FlagPostCopy)
	s.main.send(wire.TypeState, state)
	all := make([]uint64, (n+63)/64)
	for i := range all {
		all[i] = ^uint64(0)
	}
	s.main.send(wire.TypeBitmap, wire.MarshalBitmap(nil, 0, n, all))
	s.data.ctl(wire.Control{Kind: "flush", Message: "postcopy"})
	s.main.ctl(wire.Control{Kind: "postcopy"})
	s.main.expect("ready")
	s.main.ctl(wire.Control{Kind: "go"})
	s.main.expect("resumed")

	page := make([]byte, xenmem.PageSize)
	page[0], page[100] = 0x5a, 0xa5
	// The demand answer wins the page and is held after its install.
	s.prio.send(wire.TypePages, wire.PagesPrefix(nil, []uint64{pfn}, 0), page)
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the demand answer was never installed")
	}
	// The push brings the same page again (a duplicate) and every other
	// page as a zero page, then the manifest.
	s.data.send(wire.TypePages, wire.PagesPrefix(nil, []uint64{pfn}, 0), page)
	pfns := make([]uint64, 0, wire.MaxBatchPages)
	for p := range n {
		if p != pfn {
			pfns = append(pfns, p)
		}
		if len(pfns) == cap(pfns) || p == n-1 {
			s.data.send(wire.TypeZeroPages, wire.MarshalPFNs(nil, pfns))
			pfns = pfns[:0]
		}
	}
	s.data.ctl(wire.Control{Kind: "flush", Message: "pushed"})
	zero := dedup.HashPage(make([]byte, xenmem.PageSize))
	hashes := make([][16]byte, n)
	for i := range hashes {
		hashes[i] = zero
	}
	hashes[pfn] = dedup.HashPage(page)
	s.main.send(wire.TypeManifest, wire.MarshalManifest(nil, 0, hashes))
	s.main.ctl(wire.Control{Kind: "pushed"})

	type answer struct {
		m   wire.Control
		err error
	}
	answers := make(chan answer, 1)
	go func() {
		_ = s.main.c.SetReadDeadline(time.Now().Add(30 * time.Second))
		m, err := s.main.control()
		answers <- answer{m, err}
	}()
	// While the winner holds, the page is not here: no verdict yet.
	select {
	case a := <-answers:
		t.Fatalf("the destination answered %q (%s, err %v) while the page's winner had not recorded it", a.m.Kind, a.m.Message, a.err)
	case <-time.After(time.Second):
	}
	letGo()
	a := <-answers
	if a.err != nil || a.m.Kind != "done" {
		t.Fatalf("after the winner recorded the page: %q (%s), err %v; want done", a.m.Kind, a.m.Message, a.err)
	}
	var st struct {
		Verified bool `json:"verified"`
	}
	if err := json.Unmarshal(a.m.Data, &st); err != nil || !st.Verified {
		t.Fatalf("done without verified memory: %s (%v)", a.m.Data, err)
	}
}
