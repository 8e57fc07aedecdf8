package agent

import (
	"context"
	"errors"
	"flag"
	"fmt"

	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// SimDestroy ends every guest a simulated host registered under its
// state dir. Guests outlive their agent as domUs outlive a dom0 agent, so
// whoever owns a throw-away sim host (the demo, test harnesses) ends them
// explicitly; an agent never does this to the domains it adopts.
func SimDestroy(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sim-destroy", flag.ContinueOnError)
	stateDir := fs.String("state-dir", "", "the sim agent's --state-dir (required)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *stateDir == "" {
		return errors.New("--state-dir is required")
	}
	if err := sim.DestroyRegistered(*stateDir); err != nil {
		return fmt.Errorf("destroy the simulated domains under %s: %w", *stateDir, err)
	}
	return nil
}
