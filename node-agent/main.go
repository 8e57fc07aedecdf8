// Command node-agent is xenferry's per-host daemon in dom0. It serves the
// migration data path, publishes the host's inventory and, under Kubernetes,
// runs the source or target half of each VMMigration of its host.
//
// This package is the command line only: the agent lives in
// internal/agent, and each cmd_*.go file registers its subcommands through
// registerCommand (cmd_run.go parses the flags of `run`; the standalone
// commands take theirs in internal/agent). rbac.go holds the agent's RBAC
// markers, which `make manifests` reads from here.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"syscall"

	"github.com/go-logr/logr"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

// command is one subcommand of node-agent.
type command struct {
	name  string
	short string
	run   func(ctx context.Context, args []string) error
}

var commands = map[string]command{}

// registerCommand adds a subcommand; it is called from init functions.
func registerCommand(c command) {
	if _, dup := commands[c.name]; dup {
		panic("node-agent: duplicate command " + c.name)
	}
	commands[c.name] = c
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: node-agent COMMAND [flags]\n       node-agent COMMAND --help\n\ncommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-14s %s\n", n, commands[n].short)
	}
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	switch os.Args[1] {
	case "-h", "-help", "--help", "help":
		usage()
		return
	}
	c, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "node-agent: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	// Many more Ps than cores: the demand path's real-time threads, back
	// from poll(2), must find an idle P at once instead of queueing for one
	// behind the push's and the installs' goroutines; the kernel
	// arbitrates instead (docs/benchmarks.md, "The fault tail").
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(max(32, 16*runtime.NumCPU()))
	}
	if c.name != "run" {
		// Only `run` talks to Kubernetes (and sets controller-runtime's
		// logger itself); elsewhere its packages are linked in but idle,
		// and must not print "SetLogger was never called" into xl's output.
		ctrllog.SetLogger(logr.Discard())
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := c.run(ctx, os.Args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return // the flag set has printed the command's usage
		}
		fmt.Fprintf(os.Stderr, "node-agent %s: %v\n", c.name, err)
		os.Exit(1)
	}
}
