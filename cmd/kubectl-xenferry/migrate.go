package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

func newMigrateCommand(o *options) *cobra.Command {
	var to, strategy string
	var follow bool
	cmd := &cobra.Command{
		Use:   "migrate DOMAIN",
		Short: "Live-migrate a XenDomain: create a VMMigration for it",
		Long: `Creates a VMMigration (named after the domain, with a random suffix) for the
XenDomain DOMAIN of the namespace. Without --to the controller picks the
target: enough free memory, not cordoned or draining, least loaded. With
--watch the migration is then followed as by status --watch.`,
		Example: `  kubectl xenferry migrate web --to host-b --watch
  kubectl xenferry migrate db -n prod --strategy PreCopy`,
		Args: exactArgs(1, "DOMAIN"),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := parseStrategy(strategy)
			if err != nil {
				return err
			}
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			m, err := createMigration(cmd.Context(), o, ns, args[0], to, s)
			if err != nil {
				return err
			}
			if !follow {
				fmt.Fprintf(o.streams.ErrOut, "Follow it with `kubectl xenferry status %s -n %s --watch`\n", m.Name, ns)
				return nil
			}
			return watchMigration(cmd.Context(), o, ns, m.Name)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "target XenHost (default: the controller chooses)")
	cmd.Flags().StringVar(&strategy, "strategy", "", "PreCopy, PostCopy or Hybrid (default: Hybrid)")
	cmd.Flags().BoolVarP(&follow, "watch", "w", false, "follow the migration until it ends, as status --watch does")
	return cmd
}

// exactArgs is cobra.ExactArgs with a message that names the argument.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("%s needs %s (got %d arguments): see `%s --help`", cmd.Name(), what, len(args), cmd.CommandPath())
		}
		return nil
	}
}

// parseStrategy accepts a strategy in any letter case; "" keeps the
// API's default.
func parseStrategy(s string) (v1.MigrationStrategy, error) {
	if s == "" {
		return "", nil
	}
	for _, k := range []v1.MigrationStrategy{v1.StrategyPreCopy, v1.StrategyPostCopy, v1.StrategyHybrid} {
		if strings.EqualFold(s, string(k)) {
			return k, nil
		}
	}
	return "", fmt.Errorf("unknown strategy %q: use PreCopy, PostCopy or Hybrid", s)
}

// createMigration checks what it can before creating: the domain exists
// and the target is usable (the controller checks again; this only makes
// a mistake known before anything is created).
func createMigration(ctx context.Context, o *options, ns, domain, to string, s v1.MigrationStrategy) (*v1.VMMigration, error) {
	c, err := o.client()
	if err != nil {
		return nil, err
	}
	var d v1.XenDomain
	err = c.Get(ctx, types.NamespacedName{Namespace: ns, Name: domain}, &d)
	switch {
	case err == nil:
		if to != "" && d.Status.Host == to {
			return nil, fmt.Errorf("domain %s already runs on %s: pick another target (`kubectl xenferry hosts` lists them) or leave out --to", domain, to)
		}
	case kerrors.IsForbidden(err): // the controller will tell
	default:
		return nil, explain(err, "read", "XenDomain", ns, domain)
	}
	if to != "" {
		var h v1.XenHost
		err := c.Get(ctx, types.NamespacedName{Name: to}, &h)
		switch {
		case err == nil:
			if h.Spec.Unschedulable || h.Spec.Drain {
				return nil, fmt.Errorf("host %s takes no migrations: it is cordoned or draining: pick another with `kubectl xenferry hosts`, or leave out --to", to)
			}
		case kerrors.IsForbidden(err):
		default:
			return nil, explain(err, "read", "XenHost", "", to)
		}
	}
	m := &v1.VMMigration{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, GenerateName: domain + "-"},
		Spec:       v1.VMMigrationSpec{Domain: domain, TargetHost: to, Strategy: s},
	}
	if err := c.Create(ctx, m); err != nil {
		return nil, explain(err, "create", "VMMigration", ns, "")
	}
	target := orText(to, "a host the controller picks")
	fmt.Fprintf(o.streams.Out, "vmmigration/%s created: domain %s from %s to %s, strategy %s\n", m.Name, domain,
		orText(d.Status.Host, "its host"), target, orText(string(m.Spec.Strategy), string(v1.StrategyHybrid)))
	return m, nil
}

func newCancelCommand(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "cancel MIGRATION",
		Short: "Cancel a VMMigration (unless the domain already runs on the target)",
		Long: `Sets spec.cancel on the VMMigration: it stops, and the domain keeps running on
its source. A migration whose domain has resumed on the target (condition
ResumedOnTarget True) is past the point of no return and completes; cancel
then says so and changes nothing. A cancel cannot be undone.`,
		Args: exactArgs(1, "MIGRATION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			return cancelMigration(cmd.Context(), o, ns, args[0])
		},
	}
}

func cancelMigration(ctx context.Context, o *options, ns, name string) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	key := types.NamespacedName{Namespace: ns, Name: name}
	var m v1.VMMigration
	if err := c.Get(ctx, key, &m); err != nil {
		return explain(err, "read", "VMMigration", ns, name)
	}
	switch phase := phaseOf(&m); {
	case phase.IsFinal():
		return fmt.Errorf("migration %s already ended (%s): nothing to cancel", name, resultLine(&m))
	case pastPointOfNoReturn(&m):
		return tooLate(&m)
	case m.Spec.Cancel:
		fmt.Fprintf(o.streams.Out, "Cancel of %s was already requested (phase %s)\n", name, phase)
		return nil
	}
	patch := client.RawPatch(types.MergePatchType, []byte(`{"spec":{"cancel":true}}`))
	if err := c.Patch(ctx, &m, patch); err != nil {
		return explain(err, "cancel", "VMMigration", ns, name)
	}
	// The resume may have happened between the read and the patch.
	if err := c.Get(ctx, key, &m); err == nil && pastPointOfNoReturn(&m) {
		return tooLate(&m)
	}
	fmt.Fprintf(o.streams.Out, "vmmigration/%s cancel requested (phase %s): domain %s stays on %s\n", name, phaseOf(&m),
		m.Spec.Domain, orText(m.Status.SourceHost, "its source host"))
	return nil
}

func tooLate(m *v1.VMMigration) error {
	return fmt.Errorf("migration %s is past the point of no return: domain %s already runs on %s (condition %s is True), so it cannot be cancelled and will complete; to move the domain back, migrate it again: `kubectl xenferry migrate %s -n %s --to %s`",
		m.Name, m.Spec.Domain, orText(m.Status.TargetHost, "the target"), v1.ResumedOnTargetCondition,
		m.Spec.Domain, m.Namespace, orText(m.Status.SourceHost, "SOURCE"))
}
