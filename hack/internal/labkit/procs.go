package labkit

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Procs starts and stops every process of a run. Each child runs in a
// process group of its own (so a Ctrl-C in the terminal reaches only the
// harness, which then stops them in order) and gets SIGKILL should the
// harness die (Pdeathsig), so nothing outlives a run. Each child's stdout
// and stderr go to a log file of its own in LogDir, numbered in start
// order ("01-etcd.log", ...), which the harnesses keep for post-mortems.
type Procs struct {
	LogDir string
	mu     sync.Mutex
	list   []*Proc
	seq    int
}

// Proc is one child process started by Procs.
type Proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed once the process is reaped
}

// Start runs bin with args and environment env (see CleanEnv). It does not
// wait for the process to do anything; callers poll for readiness.
func (ps *Procs) Start(name string, env []string, bin string, args ...string) (*Proc, error) {
	ps.mu.Lock()
	ps.seq++
	logPath := filepath.Join(ps.LogDir, fmt.Sprintf("%02d-%s.log", ps.seq, name))
	ps.mu.Unlock()
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer lf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

// StopAll stops every process still running, newest first (agents and the
// controller before the control plane they talk to), and forgets them, so
// a second call does nothing.
func (ps *Procs) StopAll() {
	ps.mu.Lock()
	list := append([]*Proc(nil), ps.list...)
	ps.list = nil
	ps.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].Stop(5 * time.Second)
	}
}

// PID is the process's id (for a process started through `ip netns exec`,
// the id of the program it execs).
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Alive reports whether the process has not been reaped yet.
func (p *Proc) Alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Kill sends SIGKILL and waits (at most 10 s) until the process is reaped.
func (p *Proc) Kill() {
	if !p.Alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
	}
}

// Stop asks politely (SIGTERM), then kills after grace.
func (p *Proc) Stop(grace time.Duration) {
	if !p.Alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
	}
}

// Tail returns the last n bytes of the process's log ("" if unreadable).
func (p *Proc) Tail(n int64) string {
	f, err := os.Open(p.log)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	_, _ = f.ReadAt(b, off)
	return string(b)
}

// EnvDrop are the prefixes of environment entries ("NAME=value") no child
// of a harness may inherit: etcd reads every ETCD_* as a flag, XENFERRY_*
// (failpoints among them) are set per process by the harness, and a
// KUBECONFIG would point a child at a cluster other than the lab's.
var EnvDrop = []string{"ETCD_", "XENFERRY_", "KUBECONFIG="}

// CleanEnv is this process's environment without the entries that start
// with one of drop, followed by extra (which is never filtered).
func CleanEnv(drop []string, extra ...string) []string {
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, p := range drop {
			if strings.HasPrefix(kv, p) {
				continue next
			}
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}
