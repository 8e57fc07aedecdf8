package agent

import (
	"context"
	"crypto/subtle"
	"fmt"
	"path/filepath"
	"sync"

	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// tokenUses remembers, per incoming migration, that its token opened the
// migration's main connection and from which peer: the token is single
// use, and the other connections of the migration must come from the
// same peer. Bounded by the agent's runs: entries of runs gone are pruned.
type tokenUses struct {
	mu   sync.Mutex
	used map[string]tokenUse // by migration ID
}

type tokenUse struct {
	peer string // PeerHost of the main connection ("" without TLS)
}

// claim records the first main connection of a migration; a second one
// is refused.
func (t *tokenUses) claim(id, peer string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.used == nil {
		t.used = map[string]tokenUse{}
	}
	if _, dup := t.used[id]; dup {
		return fmt.Errorf("migration %q: its token was used already (single use)", id)
	}
	t.used[id] = tokenUse{peer: peer}
	return nil
}

// follow checks a later connection of a migration (data, prio, recover):
// the main connection came first, from the same peer.
func (t *tokenUses) follow(id, peer string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	u, ok := t.used[id]
	if !ok {
		return fmt.Errorf("migration %q has no main connection yet", id)
	}
	if u.peer != peer {
		return fmt.Errorf("migration %q: a connection from %q, its main connection came from %q", id, peer, u.peer)
	}
	return nil
}

// prune forgets the migrations for which live reports false.
func (t *tokenUses) prune(live func(id string) bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id := range t.used {
		if !live(id) {
			delete(t.used, id)
		}
	}
}

// authorize admits a connection of a migration this agent prepared as
// target: the token compared in constant time, the peer (when the
// connection is TLS) the migration's source host, the token used once by
// the main connection, and later connections from the same peer; a
// "recover" connection only while the domain runs here. The main
// connection gets the Grant, built from the API, never from the sender.
func (tr *TargetReconciler) authorize(ctx context.Context, req engine.AuthRequest) (*engine.Grant, error) {
	tr.mu.Lock()
	r := tr.runs[req.MigrationID]
	tr.mu.Unlock()
	if r == nil || r.role != roleTarget {
		return nil, fmt.Errorf("no migration %q is expected on %s", req.MigrationID, tr.cfg.Host)
	}
	r.mu.Lock()
	want, aborted, resumed, key := r.token, r.aborted, r.resumed, r.key
	r.mu.Unlock()
	if len(want) == 0 || subtle.ConstantTimeCompare(want, req.Token) != 1 {
		return nil, fmt.Errorf("migration %q: wrong token", req.MigrationID)
	}
	if aborted {
		return nil, fmt.Errorf("migration %q was aborted", req.MigrationID)
	}
	m := &v1.VMMigration{}
	if err := tr.c.Get(ctx, key, m); err != nil {
		return nil, fmt.Errorf("migration %q: read VMMigration %s: %w", req.MigrationID, key, err)
	}
	if string(m.UID) != req.MigrationID || m.Status.TargetHost != tr.cfg.Host {
		return nil, fmt.Errorf("migration %q: VMMigration %s is not this host's incoming migration", req.MigrationID, key)
	}
	if req.PeerHost != "" && req.PeerHost != m.Status.SourceHost {
		return nil, fmt.Errorf("migration %q: peer %q is not the migration's source host %q", req.MigrationID, req.PeerHost, m.Status.SourceHost)
	}
	switch req.Role {
	case "main":
		g, err := tr.buildGrant(ctx, m)
		if err != nil {
			return nil, fmt.Errorf("migration %q: %w", req.MigrationID, err)
		}
		tr.tokens.prune(func(id string) bool {
			tr.mu.Lock()
			defer tr.mu.Unlock()
			return tr.runs[id] != nil
		})
		if err := tr.tokens.claim(req.MigrationID, req.PeerHost); err != nil {
			return nil, err
		}
		return g, nil
	case "recover":
		if !resumed {
			return nil, fmt.Errorf("migration %q: nothing to recover (the domain does not run here)", req.MigrationID)
		}
		return nil, tr.tokens.follow(req.MigrationID, req.PeerHost)
	case "data", "prio":
		return nil, tr.tokens.follow(req.MigrationID, req.PeerHost)
	}
	return nil, fmt.Errorf("migration %q: unknown connection role %q", req.MigrationID, req.Role)
}

// buildGrant reads the migration's XenDomain and maps it to this host.
func (tr *TargetReconciler) buildGrant(ctx context.Context, m *v1.VMMigration) (*engine.Grant, error) {
	xd := &v1.XenDomain{}
	key := types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}
	if err := tr.c.Get(ctx, key, xd); err != nil {
		return nil, fmt.Errorf("read XenDomain %s: %w", key, err)
	}
	return grantFor(xd, m.Status.SourceHost, tr.cfg.DiskPath)
}

// grantFor is the Grant of a XenDomain migrating from sourceHost: memory,
// vCPUs and disks from the API object, each disk mapped by diskPath to
// this host's view of it (nil: shared storage at the same path on every
// host).
func grantFor(xd *v1.XenDomain, sourceHost string, diskPath func(v1.DomainDisk) (string, error)) (*engine.Grant, error) {
	sp := xd.Spec
	if sp.DomainName == "" {
		return nil, fmt.Errorf("XenDomain %s/%s names no domain", xd.Namespace, xd.Name)
	}
	if xd.Status.Host != sourceHost {
		return nil, fmt.Errorf("XenDomain %s/%s runs on %q, the migration comes from %q", xd.Namespace, xd.Name, xd.Status.Host, sourceHost)
	}
	if sp.MemoryBytes <= 0 || sp.MemoryBytes%xenmem.PageSize != 0 {
		return nil, fmt.Errorf("XenDomain %s/%s: memory %d bytes is not a positive multiple of 4 KiB", xd.Namespace, xd.Name, sp.MemoryBytes)
	}
	if sp.VCPUs <= 0 {
		return nil, fmt.Errorf("XenDomain %s/%s: %d vCPUs", xd.Namespace, xd.Name, sp.VCPUs)
	}
	info := xenmem.DomainInfo{Name: sp.DomainName, UUID: sp.UUID, MemoryBytes: uint64(sp.MemoryBytes), VCPUs: int(sp.VCPUs),
		Namespace: xd.Namespace, Labels: xd.Labels}
	seen := map[string]bool{}
	for i, d := range sp.Disks {
		if d.ID == "" || seen[d.ID] {
			return nil, fmt.Errorf("XenDomain %s/%s: disk %d has an empty or repeated id %q", xd.Namespace, xd.Name, i, d.ID)
		}
		seen[d.ID] = true
		p := d.Path
		if diskPath != nil {
			var err error
			if p, err = diskPath(d); err != nil {
				return nil, fmt.Errorf("XenDomain %s/%s: disk %s on this host: %w", xd.Namespace, xd.Name, d.ID, err)
			}
		}
		if !filepath.IsAbs(p) || filepath.Clean(p) != p {
			return nil, fmt.Errorf("XenDomain %s/%s: disk %s path %q is not a clean absolute path", xd.Namespace, xd.Name, d.ID, p)
		}
		info.Disks = append(info.Disks, xenmem.Disk{ID: d.ID, Path: p, ReadOnly: d.ReadOnly})
	}
	return &engine.Grant{Domain: info, SourceHost: sourceHost}, nil
}
