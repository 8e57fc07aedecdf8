package main

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// monitor follows every VMMigration through a watch: each change the API
// server stores arrives in order, so the most migrations seen holding a
// slot at once, and the order in which migrations got their slots, come
// from the stored history, not from sampling. Resource versions of one
// etcd are compared as numbers: a harness may rely on that; controllers
// must not.
type monitor struct {
	mu   sync.Mutex
	migs map[string]*migRecord // by namespace/name
	// maxOut and maxIn are the most slot holders seen at once leaving and
	// arriving at one host; maxCluster in the whole cluster.
	maxOut, maxIn, maxCluster int
	maxOutHost, maxInHost     string
	errs                      []string
	// heartbeats: per host, the last heartbeat time seen and the longest
	// gap between two (a controller fails migrations of a host whose
	// heartbeat is older than its --heartbeat-timeout).
	lastBeat map[string]time.Time
	maxGap   map[string]time.Duration
	gapFrom  map[string]time.Time // where the longest gap began
}

// migRecord is what the monitor knows of one migration.
type migRecord struct {
	name, namespace string
	labels          map[string]string
	priority        v1.MigrationPriority
	domain          string
	createRV        int64 // resource version of its creation (0: seen first by a list)
	created         time.Time
	slotRV          int64     // first stored change that showed it holding a slot
	slotSeen        time.Time // when that change arrived here
	source, target  string
	phase           v1.VMMigrationPhase
	reason          string // failureReason, or the Completed condition's reason
	endReason       string // the Completed condition's reason (Succeeded, Cancelled, Preempted, ...)
	preemptedBy     string // the annotation an evacuation left on it
	cancel          bool
	final           time.Time // when a final phase was first seen
	finalRV         int64
	last            *v1.VMMigration
}

func newMonitor() *monitor {
	return &monitor{migs: map[string]*migRecord{}, lastBeat: map[string]time.Time{}, maxGap: map[string]time.Duration{},
		gapFrom: map[string]time.Time{}}
}

func rvOf(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n }

// run watches until ctx ends, listing again whenever the watch breaks.
func (mo *monitor) run(ctx context.Context, f *fleet) {
	go mo.watchHosts(ctx, f)
	for ctx.Err() == nil {
		var list v1.VMMigrationList
		if err := f.c.List(ctx, &list); err != nil {
			mo.err("list VMMigrations: " + err.Error())
			labkit.SleepCtx(ctx, time.Second)
			continue
		}
		for i := range list.Items {
			mo.update(&list.Items[i], false)
		}
		w, err := f.c.Watch(ctx, &v1.VMMigrationList{}, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: list.ResourceVersion, AllowWatchBookmarks: false}})
		if err != nil {
			mo.err("watch VMMigrations: " + err.Error())
			labkit.SleepCtx(ctx, time.Second)
			continue
		}
		for ev := range w.ResultChan() {
			m, ok := ev.Object.(*v1.VMMigration)
			if !ok {
				continue // an error status: list again
			}
			mo.update(m, ev.Type == watch.Added)
		}
		w.Stop()
	}
}

func (mo *monitor) err(s string) {
	mo.mu.Lock()
	defer mo.mu.Unlock()
	if len(mo.errs) < 10 {
		mo.errs = append(mo.errs, s)
	}
}

func (mo *monitor) update(m *v1.VMMigration, added bool) {
	mo.mu.Lock()
	defer mo.mu.Unlock()
	key := m.Namespace + "/" + m.Name
	r := mo.migs[key]
	rv := rvOf(m.ResourceVersion)
	if r == nil {
		r = &migRecord{name: m.Name, namespace: m.Namespace, labels: m.Labels, priority: m.Spec.Priority,
			domain: m.Spec.Domain, created: m.CreationTimestamp.Time}
		if added {
			r.createRV = rv
		}
		mo.migs[key] = r
	}
	r.last = m.DeepCopy()
	r.phase = m.Status.Phase
	r.cancel = m.Spec.Cancel
	if p := m.Annotations[v1.PreemptedByAnnotation]; p != "" {
		r.preemptedBy = p
	}
	if m.Status.SourceHost != "" {
		r.source = m.Status.SourceHost
	}
	if m.Status.TargetHost != "" {
		r.target = m.Status.TargetHost
	}
	if m.Status.Phase.HoldsSlot() && r.slotRV == 0 {
		r.slotRV, r.slotSeen = rv, time.Now()
	}
	if m.Status.Phase.IsFinal() && r.finalRV == 0 {
		r.finalRV, r.final = rv, time.Now()
		r.reason = m.Status.FailureReason
		for _, c := range m.Status.Conditions {
			if c.Type == v1.CompletedCondition {
				r.endReason = c.Reason
				if r.reason == "" {
					r.reason = c.Reason
				}
			}
		}
	}
	// Slot holders now, by source, target and overall.
	out, in := map[string]int{}, map[string]int{}
	all := 0
	for _, x := range mo.migs {
		if !x.phase.HoldsSlot() {
			continue
		}
		all++
		out[x.source]++
		in[x.target]++
	}
	mo.maxCluster = max(mo.maxCluster, all)
	for h, n := range out {
		if n > mo.maxOut {
			mo.maxOut, mo.maxOutHost = n, h
		}
	}
	for h, n := range in {
		if n > mo.maxIn {
			mo.maxIn, mo.maxInHost = n, h
		}
	}
}

// snapshot copies the records, sorted by the order their slots were
// granted (those never granted last, by name).
func (mo *monitor) snapshot() []migRecord {
	mo.mu.Lock()
	defer mo.mu.Unlock()
	out := make([]migRecord, 0, len(mo.migs))
	for _, r := range mo.migs {
		c := *r
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if (a.slotRV == 0) != (b.slotRV == 0) {
			return a.slotRV != 0
		}
		if a.slotRV != b.slotRV {
			return a.slotRV < b.slotRV
		}
		return a.name < b.name
	})
	return out
}

func (mo *monitor) maxima() (out, in, cluster int, outHost, inHost string) {
	mo.mu.Lock()
	defer mo.mu.Unlock()
	return mo.maxOut, mo.maxIn, mo.maxCluster, mo.maxOutHost, mo.maxInHost
}

// watchHosts follows the XenHosts' heartbeats.
func (mo *monitor) watchHosts(ctx context.Context, f *fleet) {
	for ctx.Err() == nil {
		var list v1.XenHostList
		if err := f.c.List(ctx, &list); err != nil {
			labkit.SleepCtx(ctx, time.Second)
			continue
		}
		for i := range list.Items {
			mo.beat(&list.Items[i])
		}
		w, err := f.c.Watch(ctx, &v1.XenHostList{}, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: list.ResourceVersion}})
		if err != nil {
			labkit.SleepCtx(ctx, time.Second)
			continue
		}
		for ev := range w.ResultChan() {
			if h, ok := ev.Object.(*v1.XenHost); ok {
				mo.beat(h)
			}
		}
		w.Stop()
	}
}

func (mo *monitor) beat(h *v1.XenHost) {
	if h.Status.HeartbeatTime == nil {
		return
	}
	t := h.Status.HeartbeatTime.Time
	mo.mu.Lock()
	defer mo.mu.Unlock()
	if last, ok := mo.lastBeat[h.Name]; ok && t.Sub(last) > mo.maxGap[h.Name] {
		mo.maxGap[h.Name], mo.gapFrom[h.Name] = t.Sub(last), last
	}
	if t.After(mo.lastBeat[h.Name]) {
		mo.lastBeat[h.Name] = t
	}
}

// heartbeatGaps lists hosts whose heartbeat paused longer than d.
func (mo *monitor) heartbeatGaps(d time.Duration) []string {
	mo.mu.Lock()
	defer mo.mu.Unlock()
	var out []string
	for h, g := range mo.maxGap {
		if g > d {
			out = append(out, fmt.Sprintf("%s %.0fs from %s", h, g.Seconds(), mo.gapFrom[h].UTC().Format("15:04:05")))
		}
	}
	sort.Strings(out)
	return out
}
