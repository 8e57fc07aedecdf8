package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// openBackend opens the hypervisor backend of this host. stateDir is the
// agent's state dir: a sim host keeps its domain registry there, its
// guests outlive this process and the next agent adopts them, as a Xen
// host's domUs outlive the toolstack (configured domains boot only on the
// first start). "" (one-shot commands) makes guests die with the process.
func openBackend(name, simConfig, stateDir string, log logr.Logger) (xenmem.Host, error) {
	switch name {
	case "sim":
		if simConfig == "" {
			return nil, fmt.Errorf("--backend sim needs --sim-config FILE (a YAML host definition; see config/samples/sim/sim-host-a.yaml)")
		}
		cfg, err := sim.LoadConfig(simConfig)
		if err != nil {
			return nil, err
		}
		return sim.OpenHost(cfg, sim.Options{StateDir: stateDir}, log.WithName("sim"))
	case "xen":
		return openXen(log)
	}
	return nil, fmt.Errorf("unknown backend %q (want sim or xen)", name)
}

// simHostName is the host name a sim host definition gives ("" if it
// cannot be read; openBackend then reports why).
func simHostName(simConfig string) string {
	cfg, err := sim.LoadConfig(simConfig)
	if err != nil {
		return ""
	}
	return cfg.Name
}

// openXen is replaced by the Xen backend when it is built in.
var openXen = func(logr.Logger) (xenmem.Host, error) {
	return nil, fmt.Errorf("the xen backend is not built into this node-agent: %w", xenmem.ErrBackendAbsent)
}

// diskIndexes keeps the dedup index of every disk this agent migrates from,
// built on first use and persisted under dir.
type diskIndexes struct {
	dir string
	log logr.Logger
	mu  sync.Mutex
	ix  map[string]*dedup.Index // by disk path; one per disk of this host
}

func newDiskIndexes(dir string, log logr.Logger) *diskIndexes {
	return &diskIndexes{dir: filepath.Join(dir, "index"), log: log, ix: map[string]*dedup.Index{}}
}

// catalog returns the catalog of a domain's disks, in the domain's order.
func (d *diskIndexes) catalog(ctx context.Context, info xenmem.DomainInfo, progress func(path string, done, total int64)) (*dedup.Catalog, error) {
	var list []*dedup.Index
	for _, disk := range info.Disks {
		d.mu.Lock()
		ix, ok := d.ix[disk.Path]
		d.mu.Unlock()
		if !ok {
			var err error
			ix, err = dedup.Open(ctx, disk.Path, dedup.Options{StateDir: d.dir, Log: d.log,
				Progress: func(done, total int64) {
					if progress != nil {
						progress(disk.Path, done, total)
					}
				}})
			if err != nil {
				return nil, fmt.Errorf("index disk %s of %s: %w", disk.Path, info.Name, err)
			}
			d.mu.Lock()
			d.ix[disk.Path] = ix
			d.mu.Unlock()
		} else if err := ix.Refresh(ctx); err != nil {
			return nil, fmt.Errorf("refresh index of %s: %w", disk.Path, err)
		}
		list = append(list, ix)
	}
	return dedup.NewCatalog(list...), nil
}

func (d *diskIndexes) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, ix := range d.ix {
		ix.Close()
	}
}
