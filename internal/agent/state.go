package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"time"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// inflight is what the agent persists about its half of one migration,
// under STATE-DIR/migrations/UID.json, so that a restarted agent resolves
// the half from facts (this record, the domain's state on this host, the
// other half in the API) instead of assuming. The source writes it when the
// transfer starts, synchronously when the engine commits the domain (before
// "go" leaves), and when the transfer ends or a verdict resolves it.
type inflight struct {
	UID       string `json:"uid"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Role      string `json:"role"` // "source" or "target"
	// Domain is the backend's domain name on this host.
	Domain string `json:"domain"`
	// Committed: the engine committed the domain to the target (go).
	Committed bool `json:"committed,omitempty"`
	// VerifiedBeforeGo: the target verified every page before go.
	VerifiedBeforeGo bool `json:"verifiedBeforeGo,omitempty"`
	// Phase is the engine's phase, or "Released"/"Reclaimed" once a
	// verdict resolved a committed domain.
	Phase   string    `json:"phase,omitempty"`
	Updated time.Time `json:"updated"`
}

const (
	roleSourceName = "source"
	roleTargetName = "target"
	// phaseReleased and phaseReclaimed close a committed record.
	phaseReleased  = "Released"
	phaseReclaimed = "Reclaimed"
	// phaseVerified closes a target record: every page of the domain that
	// resumed here matched the source's manifest, recorded before "done".
	phaseVerified = "Verified"
	// maxInflight bounds the records kept: migrations run a few at a time
	// per host, so more are stale ones whose migration was never seen
	// again; the oldest resolved ones go first.
	maxInflight = 256
	// maxInflightBytes bounds what is read back from one record.
	maxInflightBytes = 16 << 10
)

// uidRE accepts what Kubernetes UIDs look like; a record's file name is
// built from it, so nothing else may reach the file system.
var uidRE = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)

func (a *Agent) stateDir() string { return filepath.Join(a.cfg.StateDir, "migrations") }

// saveStateLocked persists r's record; the caller holds r.mu. Errors are
// logged: the record is a second source of truth next to the API, never a
// reason to stop a transfer.
func (a *Agent) saveStateLocked(r *run) {
	if a.cfg.StateDir == "" {
		return
	}
	rec := inflight{UID: r.uid, Namespace: r.key.Namespace, Name: r.key.Name, Domain: r.domain,
		Committed: r.committed, VerifiedBeforeGo: r.verifiedBeforeGo, Phase: string(r.phase), Updated: time.Now().UTC()}
	if r.role == roleTarget {
		rec.Role = roleTargetName
	} else {
		rec.Role = roleSourceName
	}
	switch {
	case r.committed && r.done:
		rec.Phase = phaseReleased
	case r.committed && r.failed && r.dom == nil:
		rec.Phase = phaseReclaimed
	}
	if err := writeInflight(a.stateDir(), rec); err != nil {
		a.log.Error(err, "Could not persist the migration's state; a restarted agent falls back to the API and the domain's state", "migration", r.key)
	}
}

// recordVerified persists, before the receiver sends "done", that every
// page of an incoming post-copy was verified here: once the source has
// "done" it releases its copy, so a restarted agent must keep this domain.
func (tr *TargetReconciler) recordVerified(uid string) error {
	if tr.cfg.StateDir == "" {
		return nil
	}
	r := tr.lookup(uid)
	if r == nil {
		return fmt.Errorf("no incoming migration %s on this agent", uid)
	}
	rec := inflight{UID: uid, Namespace: r.key.Namespace, Name: r.key.Name, Role: roleTargetName,
		Phase: phaseVerified, Updated: time.Now().UTC()}
	if err := writeInflight(tr.stateDir(), rec); err != nil {
		return fmt.Errorf("persist the verified state of migration %s: %w", r.key, err)
	}
	return nil
}

// writeInflight writes rec atomically: a temporary file, fsync, rename,
// fsync of the directory.
func writeInflight(dir string, rec inflight) error {
	if !uidRE.MatchString(rec.UID) {
		return fmt.Errorf("migration state: bad UID %q", rec.UID)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("migration state dir %s: %w", dir, err)
	}
	pruneInflight(dir, rec.UID)
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode migration state %s: %w", rec.UID, err)
	}
	final := filepath.Join(dir, rec.UID+".json")
	tmp, err := os.CreateTemp(dir, rec.UID+".*.tmp")
	if err != nil {
		return fmt.Errorf("migration state %s: %w", rec.UID, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(b); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write migration state %s: %w", rec.UID, err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("migration state %s: %w", rec.UID, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// readInflight reads the record of uid; (nil, nil) when there is none.
func readInflight(dir, uid string) (*inflight, error) {
	if !uidRE.MatchString(uid) {
		return nil, fmt.Errorf("migration state: bad UID %q", uid)
	}
	f, err := os.Open(filepath.Join(dir, uid+".json"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("migration state %s: %w", uid, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxInflightBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read migration state %s: %w", uid, err)
	}
	if len(b) > maxInflightBytes {
		return nil, fmt.Errorf("migration state %s: larger than %d bytes", uid, maxInflightBytes)
	}
	var rec inflight
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("migration state %s: %w", uid, err)
	}
	if rec.UID != uid {
		return nil, fmt.Errorf("migration state %s: the record names %q", uid, rec.UID)
	}
	return &rec, nil
}

// forgetState removes the record of a migration whose half is settled.
func (a *Agent) forgetState(uid string) {
	if a.cfg.StateDir == "" || !uidRE.MatchString(uid) {
		return
	}
	_ = os.Remove(filepath.Join(a.stateDir(), uid+".json"))
}

// pruneInflight keeps the directory under maxInflight records, removing
// the oldest that do not hold an unresolved committed domain (those stay:
// they are the only trace of a paused domain waiting for a verdict).
func pruneInflight(dir, keep string) {
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) < maxInflight {
		return
	}
	type old struct {
		path string
		mod  time.Time
	}
	var cands []old
	for _, e := range ents {
		name := e.Name()
		if name == keep+".json" || e.IsDir() {
			continue
		}
		p := filepath.Join(dir, name)
		if filepath.Ext(name) == ".json" {
			uid := name[:len(name)-len(".json")]
			if rec, err := readInflight(dir, uid); err == nil && rec != nil && rec.Committed &&
				rec.Phase != phaseReleased && rec.Phase != phaseReclaimed {
				continue
			}
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		cands = append(cands, old{p, info.ModTime()})
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].mod.Before(cands[j].mod) })
	for i := 0; i < len(cands) && len(ents)-i >= maxInflight; i++ {
		_ = os.Remove(cands[i].path)
	}
}

// reportHeld logs, once at start-up, every persisted committed domain that
// no verdict resolved yet: the migration's reconcile adopts it, but one
// whose VMMigration is gone can only be resolved by an operator.
func (a *Agent) reportHeld() {
	if a.cfg.StateDir == "" {
		return
	}
	ents, err := os.ReadDir(a.stateDir())
	if err != nil {
		return
	}
	for i, e := range ents {
		if i >= maxInflight {
			break
		}
		name := e.Name()
		if filepath.Ext(name) != ".json" {
			continue
		}
		rec, err := readInflight(a.stateDir(), name[:len(name)-len(".json")])
		if err != nil || rec == nil || rec.Role != roleSourceName || !rec.Committed || rec.Phase == phaseReleased || rec.Phase == phaseReclaimed {
			continue
		}
		a.log.Info("Found a committed domain waiting for its target's verdict; it stays paused until its VMMigration resolves it",
			"migration", rec.Namespace+"/"+rec.Name, "uid", rec.UID, "domain", rec.Domain, "since", rec.Updated)
	}
}

// DefaultDurableDir is where post-copy mirrors go when --durable-dir is
// not given: a directory on the storage the backend shares between hosts,
// when it knows one. The simulated host's state directory holds the disk
// images every host of a sim cluster shares, so the mirror goes next to
// them; the Xen backend does not know which of dom0's file systems are
// shared, so on Xen durable post-copy needs --durable-dir.
func DefaultDurableDir(host xenmem.Host) string {
	if h, ok := host.(*sim.Host); ok && h.Config().StateDir != "" {
		return filepath.Join(h.Config().StateDir, "xenferry-durable")
	}
	return ""
}

// phaseOf maps a record's phase back to the engine's.
func phaseOf(rec *inflight) engine.Phase {
	switch rec.Phase {
	case phaseReleased:
		return engine.PhaseDone
	case phaseReclaimed, "":
		return engine.PhaseConnecting
	}
	return engine.Phase(rec.Phase)
}
