package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// copyOf is one guest process of a domain, on the host whose agent made it.
type copyOf struct {
	host    string // "" if its stderr is under no host's state dir
	g       labkit.Guest
	ctl     labkit.CtlView
	running bool // not paused in two reads of its control page
}

// observation is where every domain of the fleet runs, from /proc.
type observation struct {
	copies map[string][]copyOf // by domain
	strays []copyOf            // guests of domains the fleet does not have
}

const pauseProbe = 300 * time.Millisecond

func (f *fleet) observe() observation {
	obs := observation{copies: map[string][]copyOf{}}
	known := map[string]bool{}
	for _, d := range f.domains {
		known[d] = true
	}
	gs := findGuests(f.dir)
	first := map[int]labkit.CtlView{}
	for _, g := range gs {
		if c, err := labkit.ReadCtl(g.PID); err == nil {
			first[g.PID] = c
		}
	}
	time.Sleep(pauseProbe)
	for _, g := range gs {
		a, ok := first[g.PID]
		if !ok {
			continue
		}
		b, err := labkit.ReadCtl(g.PID)
		if err != nil {
			continue // exited meanwhile
		}
		c := copyOf{g: g, ctl: b, running: !a.Paused && !b.Paused}
		for h, ag := range f.agents {
			if strings.HasPrefix(g.Stderr, ag.stateDir+string(filepath.Separator)) {
				c.host = h
			}
		}
		if known[g.Domain] {
			obs.copies[g.Domain] = append(obs.copies[g.Domain], c)
		} else {
			obs.strays = append(obs.strays, c)
		}
	}
	return obs
}

// runningOn is the hosts a domain runs on.
func (o observation) runningOn(d string) []string {
	var hs []string
	for _, c := range o.copies[d] {
		if c.running {
			hs = append(hs, c.host)
		}
	}
	sort.Strings(hs)
	return hs
}

// invariants are the facts every scenario line carries.
type invariants struct {
	Lost         int `json:"lost"`
	RunningTwice int `json:"runningTwice"`
	WrongPages   int `json:"wrongPages"`
	HalfCreated  int `json:"halfCreated"`
}

func (iv invariants) clean() bool {
	return iv.Lost == 0 && iv.RunningTwice == 0 && iv.WrongPages == 0 && iv.HalfCreated == 0
}

// checkInvariants judges the fleet from the hosts' real state: guest
// processes and their memory, and each host's registry; the API's word is
// compared with it. notes explain every count that is not zero and every
// disagreement.
func (f *fleet) checkInvariants(ctx context.Context) (invariants, observation, []string) {
	var iv invariants
	var notes []string
	note := func(format string, a ...any) { notes = append(notes, fmt.Sprintf(format, a...)) }
	obs := f.observe()
	for _, d := range f.domains {
		hosts := obs.runningOn(d)
		switch {
		case len(hosts) == 0:
			iv.Lost++
			note("%s runs nowhere (%d paused copies)", d, len(obs.copies[d]))
		case len(hosts) > 1:
			iv.RunningTwice++
			note("%s runs on %v", d, hosts)
		}
		// Paused copies beside a running one: a receiving domain left
		// behind, or a source that kept its copy.
		for _, c := range obs.copies[d] {
			if !c.running && len(hosts) > 0 {
				iv.HalfCreated++
				note("%s: a paused copy (guest %s) on %s beside the one running on %v", d, c.g.ID(), hostOr(c.host), hosts)
			}
			if c.host == "" {
				note("%s: guest %s belongs to no host's state dir (stderr %s)", d, c.g.ID(), c.g.Stderr)
			}
		}
		// Memory: the running copies (or the paused ones if none runs).
		check := obs.copies[d]
		if len(hosts) > 0 {
			check = nil
			for _, c := range obs.copies[d] {
				if c.running {
					check = append(check, c)
				}
			}
		}
		worst := 0
		for _, c := range check {
			mem, err := labkit.ReadMemory(c.g.PID)
			if err != nil {
				note("%s: read memory of guest %s: %v", d, c.g.ID(), err)
				continue
			}
			n, firstPfns := f.fp[d].wrongPages(mem, c.ctl)
			if n > 0 {
				note("%s: %d pages on %s differ from its memory before the scenario (first pfns %v)", d, n, hostOr(c.host), firstPfns)
			}
			worst = max(worst, n)
		}
		iv.WrongPages += worst
	}
	for _, c := range obs.strays {
		iv.HalfCreated++
		note("a guest of unknown domain %q (guest %s) on %s", c.g.Domain, c.g.ID(), hostOr(c.host))
	}
	// The hosts' registries: an Incoming entry is a receiving domain left
	// behind even if its guest is gone; a running guest its host does not
	// list is one the host's hypervisor lost track of.
	for _, h := range f.spec.hosts {
		reg, err := readRegistry(f.agents[h].stateDir)
		if err != nil {
			note("registry of %s: %v", h, err)
			continue
		}
		listed := map[string]bool{}
		for _, e := range reg {
			listed[fmt.Sprintf("%d@%d", e.PID, e.PIDStart)] = true
			if e.State == "Incoming" {
				iv.HalfCreated++
				note("%s's registry keeps an incoming %s (pid %d)", h, e.Name, e.PID)
			}
		}
		for _, d := range f.domains {
			for _, c := range obs.copies[d] {
				if c.host == h && c.running && !listed[c.g.ID()] {
					note("%s runs on %s but its registry does not list guest %s", d, h, c.g.ID())
				}
			}
		}
	}
	// The API's word: each XenDomain names the host its guest runs on.
	for _, d := range f.domains {
		hosts := obs.runningOn(d)
		xd := &v1.XenDomain{}
		if err := f.c.Get(ctx, client.ObjectKey{Namespace: domNamespace, Name: d}, xd); err != nil {
			note("XenDomain %s: %v", d, err)
			continue
		}
		if len(hosts) == 1 && (xd.Status.Host != hosts[0] || xd.Status.State != "Running") {
			note("XenDomain %s says %s/%s, it runs on %s", d, xd.Status.Host, xd.Status.State, hosts[0])
		}
	}
	return iv, obs, notes
}

func hostOr(h string) string {
	if h == "" {
		return "no known host"
	}
	return h
}

// quiesce waits until every migration is final and both agents' halves
// ended (or limit passes), so that the state judged is the one left.
func (f *fleet) quiesce(ctx context.Context, limit time.Duration) error {
	var open []string
	err := waitFor(ctx, limit, 500*time.Millisecond, func() (bool, error) {
		var ms v1.VMMigrationList
		if err := f.c.List(ctx, &ms); err != nil {
			return false, err
		}
		open = nil
		for i := range ms.Items {
			m := &ms.Items[i]
			if !m.Status.Phase.IsFinal() || !halvesEnded(m) {
				open = append(open, fmt.Sprintf("%s(%s)", m.Name, labkit.PhaseOf(m)))
			}
		}
		return len(open) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("migrations still open: %s: %w", strings.Join(first(open, 6), ", "), err)
	}
	labkit.SleepCtx(ctx, 2*time.Second) // agents publish what they have
	return nil
}

// halvesEnded: each agent's half says it finished or never started.
func halvesEnded(m *v1.VMMigration) bool {
	src, dst := m.Status.Source, m.Status.Target
	srcDone := src == nil || src.StartTime == nil || src.Completed || src.Failed
	dstDone := dst == nil || !dst.Prepared || dst.Completed || dst.Failed || dst.Discarded
	return srcDone && dstDone
}

// checkClaims compares, for each domain, what its last final migration
// says about where the domain runs (status.domainHost; else the target of
// a Succeeded one, the source of a Cancelled one) with where it runs.
func (f *fleet) checkClaims(obs observation, recs []migRecord) (untruthful int, notes []string) {
	last := map[string]migRecord{}
	for _, r := range recs {
		if r.finalRV == 0 || r.last == nil {
			continue
		}
		if l, ok := last[r.domain]; !ok || r.finalRV > l.finalRV {
			last[r.domain] = r
		}
	}
	for d, r := range last {
		claim := r.last.Status.DomainHost
		if claim == "" {
			switch r.phase {
			case v1.MigrationSucceeded:
				claim = r.target
			case v1.MigrationCancelled:
				claim = r.source
			}
		}
		hosts := obs.runningOn(d)
		if claim == "" || len(hosts) != 1 || claim == hosts[0] {
			continue
		}
		untruthful++
		notes = append(notes, fmt.Sprintf("migration %s ended %s saying %s runs on %s; it runs on %s (%s)",
			r.name, r.phase, d, claim, hosts[0], labkit.Clip(r.last.Status.FailureReason, 160)))
	}
	sort.Strings(notes)
	return untruthful, notes
}
