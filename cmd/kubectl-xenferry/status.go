package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

func newStatusCommand(o *options) *cobra.Command {
	var follow, all bool
	var selector string
	cmd := &cobra.Command{
		Use:   "status [MIGRATION]",
		Short: "List VMMigrations, or show one (--watch: follow it live)",
		Long: `Without a name: a table of the namespace's VMMigrations (-A: of every
namespace); with --watch, one line each time one of them changes.

With a name: that migration's phase, progress, cost and conditions. With
--watch it is followed until it ends: on a terminal as a live bar (phase,
percent, rate, bytes left, ETA, dedup savings), otherwise as one plain line
per change; the last line is the result. The exit status is 2 when the
migration ended Failed or Cancelled.`,
		Example: `  kubectl xenferry status -A
  kubectl xenferry status -l migration.xenferry.io/drain-host=host-a
  kubectl xenferry status web-7xk2p --watch`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			sel, err := labels.Parse(selector)
			if err != nil {
				return fmt.Errorf("bad --selector %q: %w", selector, err)
			}
			if len(args) == 1 {
				if all || selector != "" {
					return errors.New("-A and -l pick migrations to list; to show one migration give its name, and its namespace with -n")
				}
				if follow {
					return watchMigration(cmd.Context(), o, ns, args[0])
				}
				return showMigration(cmd.Context(), o, ns, args[0])
			}
			if all {
				ns = ""
			}
			if follow {
				return watchMigrations(cmd.Context(), o, ns, sel)
			}
			return listMigrations(cmd.Context(), o, ns, sel)
		},
	}
	cmd.Flags().BoolVarP(&follow, "watch", "w", false, "follow changes until the migration ends (Ctrl-C stops watching; the migration goes on)")
	cmd.Flags().BoolVarP(&all, "all-namespaces", "A", false, "list the migrations of every namespace")
	cmd.Flags().StringVarP(&selector, "selector", "l", "", "list only the migrations with these labels, e.g. migration.xenferry.io/reason=drain")
	return cmd
}

func listMigrations(ctx context.Context, o *options, ns string, sel labels.Selector) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	var list v1.VMMigrationList
	if err := c.List(ctx, &list, client.InNamespace(ns), client.MatchingLabelsSelector{Selector: sel}); err != nil {
		return explain(err, "list", "VMMigration", ns, "")
	}
	if len(list.Items) == 0 {
		where := fmt.Sprintf("in namespace %q", ns)
		if ns == "" {
			where = "in any namespace"
		}
		if !sel.Empty() {
			where += " with labels " + sel.String()
		}
		fmt.Fprintf(o.streams.ErrOut, "No VMMigrations %s: start one with `kubectl xenferry migrate DOMAIN`\n", where)
		return nil
	}
	return migrationTable(o.streams.Out, list.Items, ns == "", o.now())
}

func showMigration(ctx context.Context, o *options, ns, name string) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	var m v1.VMMigration
	if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &m); err != nil {
		return explain(err, "read", "VMMigration", ns, name)
	}
	return describeMigration(o.streams.Out, &m, o.now())
}

// migrationView shows a watched migration: a bar or plain lines.
type migrationView interface {
	show(m *v1.VMMigration)
	end(m *v1.VMMigration)
	interrupt()
}

func (o *options) newMigrationView(name string) migrationView {
	if o.terminal(o.streams.Out) {
		return &barView{w: o.streams.Out, name: name, width: o.width(o.streams.Out)}
	}
	return &lineView{o: o}
}

// lineView prints one line per change: "15:04:05 NAME TEXT".
type lineView struct {
	o    *options
	last string
}

func (v *lineView) show(m *v1.VMMigration) {
	text := m.Name + " " + progressText(m)
	if text == v.last {
		return
	}
	v.last = text
	fmt.Fprintf(v.o.streams.Out, "%s %s\n", v.o.now().Format("15:04:05"), text)
}

func (v *lineView) end(m *v1.VMMigration) {
	fmt.Fprintf(v.o.streams.Out, "%s %s\n", v.o.now().Format("15:04:05"), resultLine(m))
}

func (v *lineView) interrupt() {}

// barView draws a progress bar of the percent done; the phase, rate, bytes
// left, ETA and dedup savings follow it on the same line.
type barView struct {
	w     io.Writer
	name  string
	width int // of the terminal; 0 unknown
	bar   *progressbar.ProgressBar
	last  string
}

// barWidth is the bar's own width on a terminal that many columns wide
// (0: unknown): 30, narrower down to 10 to leave about 72 columns to the
// text after it. barOverhead is what the percent, the bar and the spaces
// around it take before the text.
func barWidth(columns int) int {
	if columns <= 0 {
		return 30
	}
	return min(30, max(10, columns-12-72))
}

func barOverhead(columns int) int { return barWidth(columns) + 12 }

func newBar(w io.Writer, columns int, max int64, description string) *progressbar.ProgressBar {
	return progressbar.NewOptions64(max,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetWidth(barWidth(columns)),
		progressbar.OptionThrottle(0),
		progressbar.OptionUseANSICodes(true),
		progressbar.OptionShowDescriptionAtLineEnd(),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionSetElapsedTime(false),
		progressbar.OptionSetDescription(description),
	)
}

func (v *barView) show(m *v1.VMMigration) {
	text := fit(progressText(m), v.width-barOverhead(v.width)-1)
	pct := int64(0)
	if p := m.Status.Progress; p != nil {
		pct = min(max(int64(p.Percent), 0), 99) // 100 only once it Succeeded
	}
	key := fmt.Sprintf("%d %s", pct, text)
	if key == v.last {
		return
	}
	v.last = key
	if v.bar == nil {
		fmt.Fprintln(v.w, migrationHeader(m))
		v.bar = newBar(v.w, v.width, 100, text)
	}
	v.bar.Describe(text)
	_ = v.bar.Set64(pct)
}

// migrationHeader is the line above the bar: "NAME: domain D from A to B".
func migrationHeader(m *v1.VMMigration) string {
	s := fmt.Sprintf("%s: domain %s", m.Name, m.Spec.Domain)
	if m.Status.SourceHost != "" {
		s += " from " + m.Status.SourceHost
	}
	if t := orText(m.Status.TargetHost, m.Spec.TargetHost); t != "" {
		s += " to " + t
	}
	return s
}

func (v *barView) end(m *v1.VMMigration) {
	if v.bar != nil {
		if phaseOf(m) == v1.MigrationSucceeded {
			v.bar.Describe(string(v1.MigrationSucceeded))
			_ = v.bar.Finish()
		} else {
			v.bar.Describe(string(phaseOf(m)))
			_ = v.bar.Exit()
		}
		fmt.Fprintln(v.w)
	}
	fmt.Fprintln(v.w, resultLine(m))
}

func (v *barView) interrupt() {
	if v.bar != nil {
		_ = v.bar.Exit()
		fmt.Fprintln(v.w)
	}
}

// watchMigration follows one migration until it ends.
func watchMigration(ctx context.Context, o *options, ns, name string) error {
	view := o.newMigrationView(name)
	err := follow[v1.VMMigration](ctx, o, types.NamespacedName{Namespace: ns, Name: name}, &v1.VMMigrationList{},
		"VMMigration", func(m *v1.VMMigration) (bool, error) {
			phase := phaseOf(m)
			if !phase.IsFinal() {
				view.show(m)
				return false, nil
			}
			view.end(m)
			if phase == v1.MigrationSucceeded {
				return true, nil
			}
			return true, &outcomeError{msg: fmt.Sprintf("migration %s %s", name, phase)}
		})
	if errors.Is(err, errInterrupted) {
		view.interrupt()
		fmt.Fprintf(o.streams.ErrOut, "Stopped watching %s; the migration goes on. Follow it again with `kubectl xenferry status %s -n %s --watch`, stop it with `kubectl xenferry cancel %s -n %s`\n",
			name, name, ns, name, ns)
	}
	return err
}

// watchMigrations prints a line each time a migration of the namespace (or
// of every namespace, ns "") changes, until Ctrl-C.
func watchMigrations(ctx context.Context, o *options, ns string, sel labels.Selector) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	last := map[types.NamespacedName]string{}
	line := func(m *v1.VMMigration) {
		key := types.NamespacedName{Namespace: m.Namespace, Name: m.Name}
		text := progressText(m)
		if phaseOf(m).IsFinal() {
			text = resultLine(m)
		}
		if last[key] == text {
			return
		}
		last[key] = text
		name := m.Name
		if ns == "" {
			name = m.Namespace + "/" + m.Name
		}
		if phaseOf(m).IsFinal() {
			fmt.Fprintf(o.streams.Out, "%s %s\n", o.now().Format("15:04:05"), text)
		} else {
			fmt.Fprintf(o.streams.Out, "%s %s %s\n", o.now().Format("15:04:05"), name, text)
		}
	}
	for {
		var list v1.VMMigrationList
		if err := c.List(ctx, &list, client.InNamespace(ns), client.MatchingLabelsSelector{Selector: sel}); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return explain(err, "list", "VMMigration", ns, "")
		}
		for i := range list.Items {
			line(&list.Items[i])
		}
		w, err := c.Watch(ctx, &v1.VMMigrationList{}, client.InNamespace(ns), &client.ListOptions{Raw: &metav1.ListOptions{
			ResourceVersion: list.ResourceVersion, LabelSelector: sel.String()}})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return explain(err, "watch", "VMMigration", ns, "")
		}
	events:
		for {
			select {
			case <-ctx.Done():
				w.Stop()
				return nil // Ctrl-C is how a list watch ends
			case ev, ok := <-w.ResultChan():
				if !ok || ev.Type == watch.Error {
					break events
				}
				if m, ok := ev.Object.(*v1.VMMigration); ok && ev.Type != watch.Deleted {
					line(m)
				}
			}
		}
		w.Stop()
		select { // a pause, so that a watch that keeps failing costs no more than a poll
		case <-ctx.Done():
			return nil
		case <-time.After(o.pollInterval):
		}
	}
}
