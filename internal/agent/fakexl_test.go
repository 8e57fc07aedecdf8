package agent

// A stand-in for Xen's xl, enough for the xl data path: `migrate -s CMD
// DOMAIN HOST` and `migrate-receive` speak xl 4.17's handshake (banner,
// stream, "ready", permission to go, report) around a captured libxc
// stream, and keep each host's domains as files in $FAKE_XL_DIR, so that a
// test can see where a domain runs after each failure. The test binary
// becomes this program (or node-agent itself) when XENFERRY_TEST_ROLE
// says so; see TestMain.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/klauspost/compress/zstd"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/xenferry/xenferry/pkg/xlstream"
)

// nodeAgent is node-agent's main for the commands xl runs (its transport),
// as the node-agent binary wires them.
func nodeAgent(args []string) int {
	cmds := map[string]func(context.Context, []string) error{"xl-send": XLSend, "xl-recv": XLRecv, "xl-index": XLIndex}
	if len(args) == 0 || cmds[args[0]] == nil {
		fmt.Fprintf(os.Stderr, "node-agent (test): unknown command %q\n", args)
		return 2
	}
	// As node-agent: controller-runtime's logger must not print into xl's output.
	ctrllog.SetLogger(logr.Discard())
	if err := cmds[args[0]](context.Background(), args[1:]); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(os.Stderr, "node-agent %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

const (
	fakeBanner = "xl migration receiver ready, send binary domain data.\n"
	fakeReady  = "domain received, ready to unpause"
	fakeGo     = "domain is yours, you are cleared to unpause"
	fakeReport = "my copy unpause results are as follows"
)

// testRole dispatches the test binary re-executed as xl or node-agent.
func testRole() bool {
	switch os.Getenv("XENFERRY_TEST_ROLE") {
	case "node-agent":
		os.Exit(nodeAgent(os.Args[1:]))
	case "xl":
		os.Exit(fakeXL(os.Args[1:]))
	}
	return false
}

// fakeHostDir holds one host's domains: a file per domain, its content the
// state (running, suspended).
func fakeDomainState(name string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(os.Getenv("FAKE_XL_DIR"), name))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

func fakeSetDomain(name, state string) {
	p := filepath.Join(os.Getenv("FAKE_XL_DIR"), name)
	if state == "" {
		os.Remove(p)
		return
	}
	_ = os.WriteFile(p, []byte(state+"\n"), 0o644)
}

func fakeXL(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "fake xl: no command")
		return 2
	}
	switch args[0] {
	case "migrate":
		return fakeMigrate(args[1:])
	case "migrate-receive":
		return fakeReceive()
	case "info", "list", "destroy", "rename", "unpause":
		return fakeToolstack(args)
	}
	fmt.Fprintf(os.Stderr, "fake xl: unsupported command %q\n", args[0])
	return 2
}

func fakeMigrate(args []string) int {
	if len(args) != 4 || args[0] != "-s" {
		fmt.Fprintf(os.Stderr, "fake xl: usage: migrate -s CMD DOMAIN HOST (got %q)\n", args)
		return 2
	}
	cmdline, dom, host := args[1], args[2], args[3]
	if st, ok := fakeDomainState(dom); !ok || st != "running" {
		fmt.Fprintf(os.Stderr, "Domain %s not running here (%q)\n", dom, st)
		return 1
	}
	stream, err := fakeStream()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	child := exec.Command("sh", "-c", "exec "+cmdline+" "+host+" xl migrate-receive")
	child.Stderr = os.Stderr
	in, _ := child.StdinPipe()
	outPipe, _ := child.StdoutPipe()
	if err := child.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer child.Wait()
	out := bufio.NewReader(outPipe)
	resume := func(why string) int {
		fmt.Fprintln(os.Stderr, why)
		fmt.Fprintln(os.Stderr, "migration sender: Trying to resume at our end.")
		fakeSetDomain(dom, "running")
		fmt.Fprintln(os.Stderr, "migration sender: Resumed OK.")
		fmt.Fprintln(os.Stderr, "Migration failed due to problems at target.")
		in.Close()
		return 1
	}
	banner := make([]byte, len(fakeBanner))
	if _, err := io.ReadFull(out, banner); err != nil || string(banner) != fakeBanner {
		return resume(fmt.Sprintf("migration sender: no banner from the target (%v)", err))
	}
	// The last round runs with the domain suspended.
	fakeSetDomain(dom, "suspended")
	if _, err := in.Write(stream); err != nil {
		fmt.Fprintf(os.Stderr, "migration sender: libxl_domain_suspend failed (rc=-3): %v\n", err)
		return resume("Migration failed, resuming at sender.")
	}
	ready := make([]byte, len(fakeReady))
	if _, err := io.ReadFull(out, ready); err != nil || string(ready) != fakeReady {
		return resume(fmt.Sprintf("migration sender: target did not acknowledge (%v)", err))
	}
	fmt.Fprintln(os.Stderr, "migration sender: Target has acknowledged transfer.")
	fmt.Fprintln(os.Stderr, "migration sender: Giving target permission to start.")
	if _, err := in.Write([]byte(fakeGo)); err == nil {
		in.Close()
	}
	rep := make([]byte, len(fakeReport)+1)
	if _, err := io.ReadFull(out, rep); err != nil || string(rep[:len(fakeReport)]) != fakeReport {
		fakeSetDomain(dom, "")
		fakeSetDomain(dom+"--migratedaway", "suspended")
		fmt.Fprintln(os.Stderr, "** Migration failed during final handshake **")
		fmt.Fprintln(os.Stderr, "Domain state is now undefined !")
		fmt.Fprintln(os.Stderr, "Please CHECK AT BOTH ENDS for running instances, before renaming and")
		return 1
	}
	if rep[len(fakeReport)] != 0 {
		return resume(fmt.Sprintf("migration sender: Target reports startup failure (status code %d).", rep[len(fakeReport)]))
	}
	fmt.Fprintln(os.Stderr, "migration sender: Target reports successful startup.")
	fakeSetDomain(dom, "")
	fmt.Fprintln(os.Stderr, "Migration successful.")
	return 0
}

// fakeReceive is `xl migrate-receive`: FAKE_XL_DOMAIN names the domain it
// creates; FAKE_XL_FAIL=before-ready fails the restore, =no-report starts
// the domain and exits without the report.
func fakeReceive() int {
	dom := os.Getenv("FAKE_XL_DOMAIN")
	fail := os.Getenv("FAKE_XL_FAIL")
	os.Stdout.WriteString(fakeBanner)
	if d, err := time.ParseDuration(os.Getenv("FAKE_XL_SLOW")); err == nil {
		time.Sleep(d) // a slow restore: the sender's stream backs up meanwhile
	}
	rd := xlstream.NewReader(os.Stdin)
	for !rd.Complete() {
		_, err := rd.Next()
		if h := rd.XL(); dom == "" && h != nil {
			dom = fakeConfigName(h.Config)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "migration target: Domain creation failed (code -3): %v\n", err)
			fakeSetDomain(dom+"--incoming", "")
			return 1
		}
		fakeSetDomain(dom+"--incoming", "paused")
	}
	if fail == "before-ready" {
		fmt.Fprintln(os.Stderr, "migration target: Domain creation failed (code -3).")
		fakeSetDomain(dom+"--incoming", "")
		return 1
	}
	fmt.Fprintln(os.Stderr, "migration target: Transfer complete, requesting permission to start domain.")
	os.Stdout.WriteString(fakeReady)
	g := make([]byte, len(fakeGo))
	if _, err := io.ReadFull(os.Stdin, g); err != nil || string(g) != fakeGo {
		fmt.Fprintln(os.Stderr, "migration target: Failure, destroying our copy.")
		fakeSetDomain(dom+"--incoming", "")
		return 1
	}
	fmt.Fprintln(os.Stderr, "migration target: Got permission, starting domain.")
	fakeSetDomain(dom+"--incoming", "")
	fakeSetDomain(dom, "running")
	if h := rd.XL(); h != nil {
		fakeSetConfig(dom, h.Config)
	}
	if fail == "no-report" {
		return 0
	}
	os.Stdout.WriteString(fakeReport + "\x00")
	fmt.Fprintln(os.Stderr, "migration target: Domain started successsfully.")
	return 0
}

// fakeStream is the captured PV stream xl would produce.
func fakeStream() ([]byte, error) {
	z, err := os.ReadFile(os.Getenv("FAKE_XL_STREAM"))
	if err != nil {
		return nil, fmt.Errorf("fake xl: stream fixture: %w", err)
	}
	d, err := zstd.NewReader(nil)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.DecodeAll(z, nil)
}

// fakeXLHost is one host of the stand-in: its domains directory and the
// wrapper scripts that run the test binary as xl and as node-agent there.
type fakeXLHost struct {
	dir, xl, agent, stream string
}

func newFakeXLHost(t *testing.T, env ...string) fakeXLHost {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	stream, err := filepath.Abs("../../pkg/xlstream/testdata/pv.xl.zst")
	if err != nil {
		t.Fatal(err)
	}
	h := fakeXLHost{dir: t.TempDir(), stream: stream}
	bin := t.TempDir()
	vars := append([]string{"FAKE_XL_DIR=" + h.dir, "FAKE_XL_STREAM=" + stream}, env...)
	script := func(name, role string) string {
		p := filepath.Join(bin, name)
		body := "#!/bin/sh\nexport XENFERRY_TEST_ROLE=" + role + " " + strings.Join(vars, " ") + "\nexec " + exe + ` "$@"` + "\n"
		if err := os.WriteFile(p, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	h.xl, h.agent = script("xl", "xl"), script("node-agent", "node-agent")
	return h
}

func (h fakeXLHost) state(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.IsDir() {
			continue // configurations
		}
		b, err := os.ReadFile(filepath.Join(h.dir, e.Name()))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		out[e.Name()] = string(bytes.TrimSpace(b))
	}
	return out
}
