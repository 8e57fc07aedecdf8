package main

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// The fingerprint must see any change outside the hot set and any change
// to the never-written tail of a hot page's slots, and nothing else.
func TestFingerprintWrongPages(t *testing.T) {
	const pages = 64
	mem := make([]byte, pages*labkit.PageSize)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range mem {
		mem[i] = byte(r.Uint32())
	}
	c := labkit.CtlView{MemBytes: uint64(len(mem)), HotStart: 8, HotPages: 4}
	fp := takeFingerprint(mem, c)
	cases := []struct {
		name  string
		edit  func(m []byte)
		wrong int
	}{
		{"unchanged", func([]byte) {}, 0},
		{"a guest stamp in a hot page", func(m []byte) { m[9*labkit.PageSize+64] ^= 0xff }, 0},
		{"the tail of a hot page's slot", func(m []byte) { m[9*labkit.PageSize+64+labkit.StampBytes] ^= 1 }, 1},
		{"a byte of a cold page", func(m []byte) { m[30*labkit.PageSize+4095] ^= 1 }, 1},
		{"two cold pages and a hot tail", func(m []byte) { m[0] ^= 1; m[63*labkit.PageSize] ^= 1; m[11*labkit.PageSize+127] ^= 1 }, 3},
	}
	for _, tc := range cases {
		m := append([]byte(nil), mem...)
		tc.edit(m)
		if n, _ := fp.wrongPages(m, c); n != tc.wrong {
			t.Errorf("%s: %d wrong pages, want %d", tc.name, n, tc.wrong)
		}
	}
	if n, _ := fp.wrongPages(mem[:len(mem)-labkit.PageSize], c); n != pages {
		t.Errorf("a shorter memory: %d wrong pages, want every page (%d)", n, pages)
	}
	moved := c
	moved.HotStart++
	if n, _ := fp.wrongPages(mem, moved); n != pages {
		t.Errorf("a moved hot set: %d wrong pages, want every page (%d)", n, pages)
	}
}

// Hosts keep the defaults' 512 MiB until the most crowded one would be
// over three quarters full.
func TestHostMemory(t *testing.T) {
	for _, tc := range []struct{ hosts, doms, want int }{{4, 12, 512}, {4, 16, 704}, {5, 15, 640}, {6, 30, 1280}} {
		hs, ds := hostNames(tc.hosts), domainNames(tc.doms)
		got := 0
		for _, sc := range scenarios {
			got = max(got, hostMemory(sc.placement(hs, ds)))
		}
		if got != tc.want {
			t.Errorf("%d hosts, %d domains: %d MiB, want %d", tc.hosts, tc.doms, got, tc.want)
		}
	}
}

func mig(name, domain, src, dst string, phase v1.VMMigrationPhase, rv int64) *v1.VMMigration {
	return &v1.VMMigration{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, ResourceVersion: fmt.Sprint(rv)},
		Spec:       v1.VMMigrationSpec{Domain: domain},
		Status:     v1.VMMigrationStatus{Phase: phase, SourceHost: src, TargetHost: dst},
	}
}

// The monitor's maxima and slot order come from the sequence of stored
// changes, one at a time.
func TestMonitorSlots(t *testing.T) {
	mo := newMonitor()
	steps := []*v1.VMMigration{
		mig("a", "vm-1", "h1", "h2", v1.MigrationScheduling, 10),
		mig("b", "vm-2", "h1", "h3", v1.MigrationScheduling, 11),
		mig("c", "vm-3", "h2", "h3", v1.MigrationScheduling, 12),
		mig("a", "vm-1", "h1", "h2", v1.MigrationPreparingTarget, 13),
		mig("b", "vm-2", "h1", "h3", v1.MigrationPreCopy, 14),         // 2 out of h1
		mig("a", "vm-1", "h1", "h2", v1.MigrationSucceeded, 15),       // 1 out of h1
		mig("c", "vm-3", "h2", "h3", v1.MigrationPreparingTarget, 16), // 2 into h3
		mig("b", "vm-2", "h1", "h3", v1.MigrationCancelled, 17),
	}
	for i, m := range steps {
		mo.update(m, i < 3)
	}
	out, in, all, outHost, inHost := mo.maxima()
	if out != 2 || outHost != "h1" || in != 2 || inHost != "h3" || all != 2 {
		t.Errorf("maxima: out %d (%s), in %d (%s), all %d; want 2 (h1), 2 (h3), 2", out, outHost, in, inHost, all)
	}
	var order []string
	for _, r := range mo.snapshot() {
		order = append(order, fmt.Sprintf("%s@%d/%d", r.name, r.slotRV, r.createRV))
	}
	if got, want := strings.Join(order, " "), "a@13/10 b@14/11 c@16/12"; got != want {
		t.Errorf("slot order %q, want %q", got, want)
	}
}

func TestOrderViolations(t *testing.T) {
	r := func(name string, slot int64) migRecord { return migRecord{name: name, slotRV: slot} }
	e := func(name string, created, slot int64) migRecord {
		return migRecord{name: name, createRV: created, slotRV: slot}
	}
	cases := []struct {
		name   string
		es, rq []migRecord
		want   int
	}{
		{"evacuations first", []migRecord{e("e1", 20, 30), e("e2", 21, 40)}, []migRecord{r("r1", 50), r("r2", 60)}, 0},
		{"a rebalance between two evacuations", []migRecord{e("e1", 20, 30), e("e2", 21, 40)}, []migRecord{r("r1", 35)}, 1},
		{"a rebalance granted before the evacuation existed", []migRecord{e("e1", 20, 30)}, []migRecord{r("r1", 15)}, 0},
		{"an evacuation never granted", []migRecord{e("e1", 20, 0)}, []migRecord{r("r1", 50), r("r2", 0)}, 1},
		{"evacuation seen first by a list: the drain bounds it", []migRecord{e("e1", 0, 40)}, []migRecord{r("r1", 25)}, 1},
	}
	for _, tc := range cases {
		if got := orderViolations(tc.es, tc.rq, 18); len(got) != tc.want {
			t.Errorf("%s: %d violations %v, want %d", tc.name, len(got), got, tc.want)
		}
	}
}

func TestBackAndForth(t *testing.T) {
	m := func(d, from, to string) migRecord {
		return migRecord{name: d + from + to, domain: d, source: from, target: to}
	}
	moves := []migRecord{m("vm-1", "a", "b"), m("vm-2", "a", "c"), m("vm-1", "b", "c"), m("vm-2", "c", "a"), m("vm-1", "c", "b")}
	got := backAndForth(moves)
	if len(got) != 2 {
		t.Errorf("%d oscillations %v, want 2 (vm-2 a->c->a, vm-1 b->c->b)", len(got), got)
	}
}
