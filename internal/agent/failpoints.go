package agent

// Failpoints hold an outgoing migration at a named point so that a fault
// harness (hack/faults) can inject a fault while the migration is in a
// phase that is otherwise too short to hit, and know exactly when it got
// there. They follow etcd's gofail in spirit (named points, actions from the
// environment, off unless configured) without code generation: the points
// sit on the source domain handle the engine drives, so the engine needs no
// knowledge of them.
//
// Configuration, read on every evaluation so a harness can change it while
// the agent runs:
//
//	XENFERRY_FAILPOINTS       "name=action[;name=action...]"
//	XENFERRY_FAILPOINTS_FILE  a file holding the same syntax (lines or ';'),
//	                          re-read on each evaluation; a missing file is empty
//	XENFERRY_FAILPOINTS_DIR   where "<name>.hit" markers are written when a
//	                          point is reached (the harness waits on them)
//
// Actions: "sleep:DURATION" (at most maxFailpointSleep), "mark" (only write
// the marker), "off". Points, in the order a migration reaches them:
//
//	start      the engine's first use of the domain, before it connects
//	pause      right after the domain was paused for the switch-over
//	savestate  before the vCPU state is saved: inside StopAndCopy for a
//	           stop-and-copy switch (and at the start of PostCopy otherwise)
//	release    before the source destroys its domain after the destination
//	           confirmed it runs the domain
//
// With none of the variables set failpointSource returns the handle itself:
// production agents pay nothing.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Environment variables that configure failpoints.
const (
	envFailpoints     = "XENFERRY_FAILPOINTS"
	envFailpointsFile = "XENFERRY_FAILPOINTS_FILE"
	envFailpointsDir  = "XENFERRY_FAILPOINTS_DIR"
)

// maxFailpointSleep bounds a sleep action: a failpoint delays, it never
// wedges an agent.
const maxFailpointSleep = 2 * time.Minute

// failpointNames are the points failpointSource evaluates.
var failpointNames = map[string]bool{"start": true, "pause": true, "savestate": true, "release": true}

// failpointAction is what a point does when reached.
type failpointAction struct {
	sleep time.Duration
	mark  bool
}

// parseFailpoints reads "name=action" terms separated by ';' or newlines.
func parseFailpoints(spec string) (map[string]failpointAction, error) {
	out := map[string]failpointAction{}
	for _, term := range strings.FieldsFunc(spec, func(r rune) bool { return r == ';' || r == '\n' }) {
		term = strings.TrimSpace(term)
		if term == "" || strings.HasPrefix(term, "#") {
			continue
		}
		name, act, ok := strings.Cut(term, "=")
		name, act = strings.TrimSpace(name), strings.TrimSpace(act)
		if !ok || !failpointNames[name] {
			return nil, fmt.Errorf("failpoint %q: want NAME=ACTION with NAME one of start, pause, savestate, release", term)
		}
		switch {
		case act == "off":
			delete(out, name)
		case act == "mark":
			out[name] = failpointAction{mark: true}
		case strings.HasPrefix(act, "sleep:"):
			d, err := time.ParseDuration(strings.TrimPrefix(act, "sleep:"))
			if err != nil || d < 0 || d > maxFailpointSleep {
				return nil, fmt.Errorf("failpoint %q: sleep wants a duration in [0, %v]", term, maxFailpointSleep)
			}
			out[name] = failpointAction{sleep: d, mark: true}
		default:
			return nil, fmt.Errorf("failpoint %q: unknown action %q (want sleep:DURATION, mark or off)", term, act)
		}
	}
	return out, nil
}

// failpoints evaluates the configured points.
type failpoints struct {
	static string // XENFERRY_FAILPOINTS
	file   string // XENFERRY_FAILPOINTS_FILE
	dir    string // XENFERRY_FAILPOINTS_DIR
	log    logr.Logger
}

// failpointsFromEnv returns nil when no failpoint variable is set.
func failpointsFromEnv() *failpoints {
	fp := &failpoints{static: os.Getenv(envFailpoints), file: os.Getenv(envFailpointsFile), dir: os.Getenv(envFailpointsDir),
		log: ctrllog.Log.WithName("failpoint")}
	if fp.static == "" && fp.file == "" && fp.dir == "" {
		return nil
	}
	return fp
}

// action is what point name does now; a bad configuration is reported and
// ignored (a failpoint must never break the migration it observes).
func (fp *failpoints) action(name string) (failpointAction, bool) {
	spec := fp.static
	if fp.file != "" {
		if b, err := os.ReadFile(fp.file); err == nil {
			spec += "\n" + string(b)
		}
	}
	acts, err := parseFailpoints(spec)
	if err != nil {
		fp.log.Error(err, "Ignoring the failpoint configuration")
		return failpointAction{}, false
	}
	a, ok := acts[name]
	if !ok && fp.dir != "" {
		// With a marker directory every point at least reports itself.
		return failpointAction{mark: true}, true
	}
	return a, ok
}

// eval runs point name for domain dom.
func (fp *failpoints) eval(name, dom string) {
	a, ok := fp.action(name)
	if !ok {
		return
	}
	if a.mark && fp.dir != "" {
		// One line per hit: "<unix nanos> <domain> <sleep>".
		line := fmt.Sprintf("%d %s %s\n", time.Now().UnixNano(), dom, a.sleep)
		f, err := os.OpenFile(filepath.Join(fp.dir, name+".hit"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err == nil {
			_, err = f.WriteString(line)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			fp.log.Error(err, "Could not write the failpoint marker", "point", name)
		}
	}
	if a.sleep > 0 {
		fp.log.Info("Holding the migration at a failpoint", "point", name, "domain", dom, "for", a.sleep)
		time.Sleep(a.sleep)
	}
}

// failpointSource wraps a source domain handle with the configured points;
// with none configured it returns sd itself. The wrapper embeds the
// interface, so methods added to xenmem.SourceDomain pass straight through.
func failpointSource(sd xenmem.SourceDomain) xenmem.SourceDomain {
	fp := failpointsFromEnv()
	if fp == nil {
		return sd
	}
	return &fpSource{SourceDomain: sd, fp: fp}
}

type fpSource struct {
	xenmem.SourceDomain
	fp    *failpoints
	start sync.Once
}

func (s *fpSource) name() string { return s.SourceDomain.Info().Name }

// NumPages is the engine's first call on the handle (newSource), made in
// the transfer goroutine: the "start" point holds the migration there.
func (s *fpSource) NumPages() uint64 {
	s.start.Do(func() { s.fp.eval("start", s.name()) })
	return s.SourceDomain.NumPages()
}

func (s *fpSource) Pause() error {
	if err := s.SourceDomain.Pause(); err != nil {
		return err
	}
	s.fp.eval("pause", s.name())
	return nil
}

func (s *fpSource) SaveState() ([]byte, error) {
	s.fp.eval("savestate", s.name())
	return s.SourceDomain.SaveState()
}

func (s *fpSource) Release() error {
	s.fp.eval("release", s.name())
	return s.SourceDomain.Release()
}
