package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// newDrainCommand makes `drain HOST` (drain true) or `undrain HOST`.
func newDrainCommand(o *options, drain bool) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "drain HOST",
		Short: "Evacuate a XenHost: live-migrate all its domains away",
		Long: `Sets spec.drain on the XenHost: no migration targets it any more, and the
controller live-migrates every domain away within the concurrency limits
(maintenance mode). With --watch the evacuation is shown until the host is
evacuated: domains left, migrating, migrated, and those that cannot move
with the reason. Undo it with undrain.`,
		Example: `  kubectl xenferry drain host-a --watch`,
		Args:    exactArgs(1, "HOST"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := setDrain(cmd.Context(), o, args[0], true); err != nil {
				return err
			}
			if !follow {
				fmt.Fprintf(o.streams.ErrOut, "Follow it with `kubectl xenferry drain %s --watch`; undo it with `kubectl xenferry undrain %s`\n", args[0], args[0])
				return nil
			}
			return watchDrain(cmd.Context(), o, args[0])
		},
	}
	if drain {
		cmd.Flags().BoolVarP(&follow, "watch", "w", false, "show the evacuation until the host is evacuated (Ctrl-C stops watching; the drain goes on)")
		return cmd
	}
	cmd.Use = "undrain HOST"
	cmd.Short = "Undo a drain: stop evacuating a XenHost"
	cmd.Long = `Sets spec.drain back to false: no new evacuation migration starts, those not
past the point of no return are cancelled, and the host takes migrations
again (unless it is cordoned). A host whose Kubernetes Node is cordoned
stays drained until the Node is uncordoned.`
	cmd.Example = `  kubectl xenferry undrain host-a`
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		return setDrain(cmd.Context(), o, args[0], false)
	}
	return cmd
}

func setDrain(ctx context.Context, o *options, host string, drain bool) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	var h v1.XenHost
	if err := c.Get(ctx, types.NamespacedName{Name: host}, &h); err != nil {
		return explain(err, "read", "XenHost", "", host)
	}
	verb := map[bool]string{true: "drain", false: "undrain"}[drain]
	if h.Spec.Drain != drain {
		patch := client.RawPatch(types.MergePatchType, fmt.Appendf(nil, `{"spec":{"drain":%t}}`, drain))
		if err := c.Patch(ctx, &h, patch); err != nil {
			return explain(err, verb, "XenHost", "", host)
		}
	}
	switch {
	case drain && h.Status.Domains == 0:
		fmt.Fprintf(o.streams.Out, "xenhost/%s drained: no new migration targets it; it runs no domains\n", host)
	case drain && h.Status.Domains == 1:
		fmt.Fprintf(o.streams.Out, "xenhost/%s drained: its domain will be live-migrated away\n", host)
	case drain:
		fmt.Fprintf(o.streams.Out, "xenhost/%s drained: its %d domains will be live-migrated away\n", host, h.Status.Domains)
	default:
		fmt.Fprintf(o.streams.Out, "xenhost/%s undrained: no new evacuation starts; those not past the point of no return are cancelled\n", host)
		if d := h.Status.Drain; d != nil && d.Reason == v1.DrainReasonNodeCordoned {
			fmt.Fprintf(o.streams.ErrOut, "Note: the host's Node is cordoned, which drains it too: `kubectl uncordon %s` ends that\n", host)
		}
	}
	return nil
}

// drainView shows a host's evacuation: a bar on a terminal, lines otherwise.
type drainView struct {
	o       *options
	w       io.Writer
	bar     *progressbar.ProgressBar
	last    string
	blocked []v1.BlockedDomain
}

func (v *drainView) show(h *v1.XenHost) {
	text := drainText(h)
	if text == v.last {
		return
	}
	v.last = text
	if !v.o.terminal(v.w) {
		fmt.Fprintf(v.w, "%s %s %s\n", v.o.now().Format("15:04:05"), h.Name, text)
		return
	}
	// On the bar's line, the blocked domains have lines of their own.
	columns := v.o.width(v.w)
	text = fit(strings.SplitN(text, partSep+"blocked: ", 2)[0], columns-barOverhead(columns)-1)
	done, total := drainProgress(h)
	if v.bar == nil {
		fmt.Fprintf(v.w, "Draining %s:\n", h.Name)
		v.bar = newBar(v.w, columns, total, text)
	}
	// Domains that cannot move get a line of their own, above the bar.
	if d := h.Status.Drain; d != nil && !slices.Equal(d.Blocked, v.blocked) {
		v.blocked = slices.Clone(d.Blocked)
		fmt.Fprint(v.w, "\r\033[2K") // the bar's line, cleared; the bar comes back below
		for _, b := range d.Blocked {
			fmt.Fprintf(v.w, "blocked: %s/%s: %s\n", b.Namespace, b.Name, b.Reason)
		}
	}
	v.bar.ChangeMax64(total)
	v.bar.Describe(text)
	_ = v.bar.Set64(min(done, total-1)) // full only once Evacuated
}

func (v *drainView) end(line string, full bool) {
	if v.bar != nil {
		if full {
			_ = v.bar.Finish()
		} else {
			_ = v.bar.Exit()
		}
		fmt.Fprintln(v.w)
	}
	if line != "" {
		if v.o.terminal(v.w) {
			fmt.Fprintln(v.w, line)
		} else {
			fmt.Fprintf(v.w, "%s %s\n", v.o.now().Format("15:04:05"), line)
		}
	}
}

// watchDrain shows the host's drain status until it is Evacuated.
func watchDrain(ctx context.Context, o *options, host string) error {
	v := &drainView{o: o, w: o.streams.Out}
	err := follow[v1.XenHost](ctx, o, types.NamespacedName{Name: host}, &v1.XenHostList{}, "XenHost",
		func(h *v1.XenHost) (bool, error) {
			v.show(h)
			switch {
			case evacuated(h):
				v.end(drainSummary(h), true)
				return true, nil
			case !h.Spec.Drain && !meta.IsStatusConditionTrue(h.Status.Conditions, v1.HostDrainingCondition):
				v.end(fmt.Sprintf("host %s is no longer draining: the drain was undone", host), false)
				return true, &outcomeError{msg: "drain undone"}
			}
			return false, nil
		})
	if errors.Is(err, errInterrupted) {
		v.end("", false)
		fmt.Fprintf(o.streams.ErrOut, "Stopped watching %s; the drain goes on. Follow it again with `kubectl xenferry drain %s --watch`, undo it with `kubectl xenferry undrain %s`\n",
			host, host, host)
	}
	return err
}

func newHostsCommand(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "hosts",
		Short: "List XenHosts with their capacity and load",
		Long: `A table of the XenHosts: backend, agent ready, cordoned, draining, domains,
memory used of capacity, CPU load (the domains' vCPU time, averaged over
about a minute, of the host's CPUs) and free memory.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			var list v1.XenHostList
			if err := c.List(cmd.Context(), &list); err != nil {
				return explain(err, "list", "XenHost", "", "")
			}
			if len(list.Items) == 0 {
				fmt.Fprintln(o.streams.ErrOut, "No XenHosts: each host's node agent creates its XenHost when it starts (see docs/operator.md)")
				return nil
			}
			return hostTable(o.streams.Out, list.Items, o.now())
		},
	}
}

func newPlanCommand(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "plan POLICY",
		Short: "Show a RebalancePolicy's view of the hosts and its plan",
		Long: `Shows a RebalancePolicy's status: whether it is active, the imbalance, each
host's load, the planned moves (domain, from → to, the imbalance after the
move, its predicted bytes and time, the migration started for it), the
hosts that could be emptied (Density mode) and the last decision.`,
		Args: exactArgs(1, "POLICY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			var p v1.RebalancePolicy
			if err := c.Get(cmd.Context(), types.NamespacedName{Name: args[0]}, &p); err != nil {
				return explain(err, "read", "RebalancePolicy", "", args[0])
			}
			return planReport(o.streams.Out, &p, o.now())
		},
	}
}
