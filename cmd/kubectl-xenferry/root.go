package main

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// options is what every command shares: the kubectl connection flags, the
// streams, and the seams tests set.
type options struct {
	flags   *genericclioptions.ConfigFlags
	streams genericiooptions.IOStreams

	// terminal reports whether w is a terminal (a bar) or not (plain lines).
	terminal func(w io.Writer) bool
	// width is the terminal's width in columns, 0 when unknown.
	width func(w io.Writer) int
	// now is the clock for ages and timestamps.
	now func() time.Time
	// pollInterval bounds the wait between reads when the API's watch is
	// not available.
	pollInterval time.Duration

	c client.WithWatch
}

func newRootCommand(streams genericiooptions.IOStreams) *cobra.Command {
	o := &options{
		flags:        genericclioptions.NewConfigFlags(true),
		streams:      streams,
		terminal:     isTerminal,
		width:        terminalWidth,
		now:          time.Now,
		pollInterval: time.Second,
	}
	cmd := &cobra.Command{
		Use:   "kubectl-xenferry",
		Short: "Live-migrate Xen domains, drain hosts and read their load",
		Long: `kubectl xenferry drives xenferry, the live migration operator for Xen:
start, follow and cancel VMMigrations, drain and undrain XenHosts, list hosts
with their capacity and load, and show a RebalancePolicy's plan.`,
		Annotations:   map[string]string{cobra.CommandDisplayNameAnnotation: "kubectl xenferry"},
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.SetIn(streams.In)
	cmd.SetOut(streams.Out)
	cmd.SetErr(streams.ErrOut)
	o.flags.AddFlags(cmd.PersistentFlags())
	cmd.AddCommand(
		newMigrateCommand(o),
		newDrainCommand(o, true),
		newDrainCommand(o, false),
		newStatusCommand(o),
		newCancelCommand(o),
		newHostsCommand(o),
		newPlanCommand(o),
	)
	return cmd
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func terminalWidth(w io.Writer) int {
	if f, ok := w.(*os.File); ok {
		if cols, _, err := term.GetSize(int(f.Fd())); err == nil {
			return cols
		}
	}
	return 0
}

// client returns the API client, made on first use from the kubectl flags.
func (o *options) client() (client.WithWatch, error) {
	if o.c != nil {
		return o.c, nil
	}
	cfg, err := o.flags.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("no usable kubeconfig: %w: point --kubeconfig (or KUBECONFIG) at one, or choose a --context", err)
	}
	scheme := runtime.NewScheme()
	if err := v1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	// controller-runtime's own REST mapper: it discovers lazily, per
	// group, and sees CRDs installed after it started.
	c, err := client.NewWithWatch(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("cannot make an API client: %w", err)
	}
	o.c = c
	return c, nil
}

// namespace is -n, else the kubeconfig context's namespace, else "default".
func (o *options) namespace() (string, error) {
	ns, _, err := o.flags.ToRawKubeConfigLoader().Namespace()
	if err != nil {
		return "", fmt.Errorf("cannot tell the namespace: %w: give one with -n", err)
	}
	return ns, nil
}

// explain turns an API error about kind/name into what happened and what
// to do next. ns is empty for cluster-scoped kinds.
func explain(err error, verb, kind, ns, name string) error {
	var urlErr *url.Error
	what := kind
	if name != "" {
		what = fmt.Sprintf("%s %q", kind, name)
	}
	if ns != "" {
		what += fmt.Sprintf(" in namespace %q", ns)
	}
	switch {
	case meta.IsNoMatchError(err):
		return fmt.Errorf("the xenferry CRDs are not installed in this cluster (the API server does not know %s.%s): "+
			"install them with `kubectl apply -k config/crd` from the xenferry repository (or `kubectl kustomize config/default | kubectl apply -f -` for the whole operator), then retry",
			kind, v1.GroupVersion.Group)
	case kerrors.IsNotFound(err):
		return fmt.Errorf("%s not found: %s", what, listHint(kind, ns))
	case kerrors.IsForbidden(err):
		return fmt.Errorf("not allowed to %s %s: %v: ask your cluster administrator for access (see docs/rbac.md)", verb, what, kerrors.ReasonForError(err))
	case kerrors.IsInvalid(err):
		return fmt.Errorf("the API server refused to %s %s: %v", verb, what, err)
	case kerrors.IsConflict(err):
		return fmt.Errorf("%s changed while it was being updated: run the command again", what)
	case errors.As(err, &urlErr):
		return fmt.Errorf("cannot reach the API server: %v: check --kubeconfig and --context (`kubectl cluster-info` shows which server they name)", err)
	}
	return fmt.Errorf("%s %s: %w", verb, what, err)
}

// listHint says how to see what exists.
func listHint(kind, ns string) string {
	nsFlag := ""
	if ns != "" {
		nsFlag = " -n " + ns
	}
	switch kind {
	case "VMMigration":
		return "list them with `kubectl xenferry status" + nsFlag + "` (or -A for every namespace)"
	case "XenHost":
		return "list the hosts with `kubectl xenferry hosts`"
	case "XenDomain":
		return "list the domains with `kubectl get xendomains" + nsFlag + "` (or -A for every namespace)"
	case "RebalancePolicy":
		return "list the policies with `kubectl get rebalancepolicies`"
	}
	return ""
}
