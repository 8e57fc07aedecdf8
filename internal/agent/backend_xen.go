package agent

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/xen"
)

// The Xen backend: inventory from the toolstack (package xenmem/xen).
func init() {
	openXen = func(log logr.Logger) (xenmem.Host, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return xen.Open(ctx, xen.Options{Log: log.WithName("xen")})
	}
}

// inventory is what `node-agent inventory` prints: the same HostInfo and
// DomainInfo the agent publishes.
type inventory struct {
	Host    xenmem.HostInfo     `json:"host"`
	Domains []xenmem.DomainInfo `json:"domains"`
}

// Inventory is `node-agent inventory`: the host and its domains as the
// backend sees them, as JSON on stdout.
func Inventory(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("inventory", flag.ContinueOnError)
	backend := fs.String("backend", "xen", "hypervisor backend: sim or xen")
	simConfig := fs.String("sim-config", "", "sim backend: host definition (YAML)")
	withConfig := fs.Bool("config", false, "include each domain's backend configuration")
	if err := fs.Parse(args); err != nil {
		return err
	}
	host, err := OpenBackend(*backend, *simConfig, "", stderrLogger(0))
	if err != nil {
		return fmt.Errorf("open %s backend: %w", *backend, err)
	}
	defer host.Close()
	var inv inventory
	if inv.Host, err = host.Info(ctx); err != nil {
		return err
	}
	if inv.Domains, err = host.Domains(ctx); err != nil {
		return err
	}
	if !*withConfig {
		for i := range inv.Domains {
			inv.Domains[i].Config = nil
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(inv)
}
