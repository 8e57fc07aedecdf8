// Command kubectl-xenferry is xenferry's kubectl plugin: start, follow and
// cancel live migrations, drain and undrain hosts, and read hosts' load and
// a RebalancePolicy's plan. Put it on PATH and run `kubectl xenferry`;
// docs/kubectl-plugin.md has the usage.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/klog/v2"
)

func main() {
	// client-go logs retries and discovery failures through klog; the
	// errors this command returns say what matters, once.
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand(genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr}).ExecuteContext(ctx)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// Exit codes: 0 done; 1 the command failed (its message says why and what
// to do); 2 a watched migration ended Failed or Cancelled, or a watched
// drain was undone; 130 interrupted (Ctrl-C) while watching.
const (
	exitFailed      = 1
	exitOutcome     = 2
	exitInterrupted = 130
)

// outcomeError is a watch that ended as the user did not want: its line was
// printed already, so main prints nothing more.
type outcomeError struct{ msg string }

func (e *outcomeError) Error() string { return e.msg }

// errInterrupted ends a watch on Ctrl-C; the note was printed already.
var errInterrupted = errors.New("interrupted")

func exitCode(err error, stderr io.Writer) int {
	var outcome *outcomeError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errInterrupted):
		return exitInterrupted
	case errors.As(err, &outcome):
		return exitOutcome
	}
	fmt.Fprintf(stderr, "error: %v\n", err)
	return exitFailed
}
