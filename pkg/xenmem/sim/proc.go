package sim

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// guestProc is the agent's view of one guest process.
type guestProc struct {
	cmd  *exec.Cmd
	pid  int
	sock int // agent end of the socketpair; closing it tells the guest to exit
	// uffd is the guest's userfaultfd (-1 if it could not be created; then
	// uffdErr says why). It operates on the guest's address space.
	uffd    int
	uffdErr error
	base    uint64 // address of guest memory in the guest process
	pagemap *os.File
	exited  chan struct{} // closed when the process has exited
	stderr  *boundedBuffer

	// pidfd refers to the guest process when this agent adopted it (not
	// its child): kill and exit detection go through it, so a reused pid
	// is never signalled. -1 for a child of this agent.
	pidfd int
	start uint64 // start time of pid (procStartTime), for the registry
	// quit stops the goroutine that watches pidfd (detach).
	quit chan struct{}

	killOnce   sync.Once
	detachOnce sync.Once
}

// helloTimeout bounds how long a new guest may take to report in.
const helloTimeout = 20 * time.Second

// startGuest re-executes the current binary as a guest process sharing mem
// and ctl, and waits for its hello. With a sockPath (a host with a state
// dir) the guest outlives this agent: no Pdeathsig, its own session, stderr
// to logPath, and it serves sockPath for the next agent (see serveAgents).
// Without one it dies with the agent.
func startGuest(name string, mem, ctl *os.File, sockPath, logPath string) (_ *guestProc, retErr error) {
	// /proc/self/exe works even when the binary was replaced or deleted
	// since it started (upgrades, go run's temporary binaries).
	exe := "/proc/self/exe"
	if _, err := os.Stat(exe); err != nil {
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("start guest: find own executable: %w", err)
		}
	}
	if len(sockPath) >= len(unix.RawSockaddrUnix{}.Path) {
		return nil, fmt.Errorf("start guest: socket path %s is longer than a unix socket allows (%d bytes): use a shorter state dir", sockPath, len(unix.RawSockaddrUnix{}.Path)-1)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start guest: socketpair: %w", err)
	}
	child := os.NewFile(uintptr(fds[1]), "guest-sock")
	defer child.Close()
	g := &guestProc{sock: fds[0], uffd: -1, pidfd: -1, exited: make(chan struct{}), stderr: &boundedBuffer{max: 4096}}
	defer func() {
		if retErr != nil {
			g.kill()
		}
	}()
	g.cmd = exec.Command(exe)
	g.cmd.Args = []string{"xenferry-sim-guest", "domain=" + name} // what ps shows
	// No asynchronous preemption signals in the guest: a signal interrupts
	// a vCPU waiting in a userfaultfd fault and makes it fault again.
	g.cmd.Env = append(os.Environ(), guestEnv+"=1", "GODEBUG=asyncpreemptoff=1")
	g.cmd.ExtraFiles = []*os.File{mem, ctl, child}
	g.cmd.Stderr = g.stderr
	if sockPath == "" {
		// The guest never outlives the agent: SIGKILL when the agent dies,
		// and the guest also exits on EOF of its socket.
		g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	} else {
		// The guest outlives the agent, as a domU outlives dom0's
		// toolstack: its own session (no signal to the agent's process
		// group reaches it) and stderr to a file, since a pipe to a dead
		// agent would kill it with SIGPIPE on its first write.
		lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			unix.Close(g.sock)
			close(g.exited)
			return nil, fmt.Errorf("start guest: log file: %w", err)
		}
		defer lf.Close()
		g.cmd.Stderr = lf
		g.cmd.Env = append(g.cmd.Env, guestSockEnv+"="+sockPath)
		g.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := spawn(g.cmd); err != nil {
		unix.Close(g.sock)
		close(g.exited)
		return nil, fmt.Errorf("start guest %s: %w", exe, err)
	}
	g.pid = g.cmd.Process.Pid
	g.start, _ = procStartTime(g.pid)
	go func() {
		_ = g.cmd.Wait()
		close(g.exited)
	}()
	child.Close()

	// Wait for the hello (bounded), then read it with the fd.
	pfd := []unix.PollFd{{Fd: int32(g.sock), Events: unix.POLLIN}}
	deadline := time.Now().Add(helloTimeout)
	for {
		n, err := unix.Poll(pfd, 100)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("start guest pid %d: poll: %w", g.pid, err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("start guest pid %d: no hello within %v", g.pid, helloTimeout)
		}
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := unix.Recvmsg(g.sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("start guest pid %d: read hello: %w", g.pid, err)
	}
	if n < 24 || binary.LittleEndian.Uint64(buf) != helloMagic {
		g.kill()
		<-g.exited
		msg := g.stderr.Bytes()
		if logPath != "" {
			if raw, err := os.ReadFile(logPath); err == nil {
				msg = raw[:min(len(raw), 4096)]
			}
		}
		return nil, fmt.Errorf("start guest pid %d: guest failed before reporting in: %s", g.pid, bytes.TrimSpace(msg))
	}
	g.base = binary.LittleEndian.Uint64(buf[8:])
	if errno := binary.LittleEndian.Uint64(buf[16:]); errno != 0 {
		g.uffdErr = fmt.Errorf("guest pid %d has no userfaultfd: %s", g.pid, buf[24:n])
	} else {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			return nil, fmt.Errorf("start guest pid %d: hello without userfaultfd (%d control messages): %v", g.pid, len(msgs), err)
		}
		rights, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(rights) != 1 {
			return nil, fmt.Errorf("start guest pid %d: hello control message: %v", g.pid, err)
		}
		g.uffd = rights[0]
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", g.pid))
	if err != nil {
		return nil, fmt.Errorf("start guest pid %d: %w", g.pid, err)
	}
	g.pagemap = pm
	return g, nil
}

// kill ends the guest process and releases the agent's descriptors. Safe to
// call more than once; waits for the process to be reaped.
func (g *guestProc) kill() {
	g.killOnce.Do(func() {
		switch {
		case g.cmd != nil && g.cmd.Process != nil:
			_ = g.cmd.Process.Kill()
		case g.pidfd >= 0:
			_ = unix.PidfdSendSignal(g.pidfd, unix.SIGKILL, nil, 0)
		}
		if g.sock >= 0 {
			unix.Close(g.sock)
		}
		if g.cmd != nil && g.cmd.Process != nil || g.pidfd >= 0 {
			<-g.exited
		}
		g.release()
	})
}

// signalKill sends the guest SIGKILL without waiting; kill completes the
// job.
func (g *guestProc) signalKill() {
	switch {
	case g.cmd != nil && g.cmd.Process != nil:
		_ = g.cmd.Process.Kill()
	case g.pidfd >= 0:
		_ = unix.PidfdSendSignal(g.pidfd, unix.SIGKILL, nil, 0)
	}
}

// detach releases the agent's descriptors and leaves the guest running
// (a host with a state dir closing: the next agent adopts it).
func (g *guestProc) detach() {
	g.killOnce.Do(func() {
		if g.sock >= 0 {
			unix.Close(g.sock)
		}
		g.release()
	})
}

func (g *guestProc) release() {
	g.detachOnce.Do(func() {
		if g.uffd >= 0 {
			unix.Close(g.uffd)
			g.uffd = -1
		}
		if g.pagemap != nil {
			g.pagemap.Close()
		}
		if g.quit != nil {
			close(g.quit)
		}
	})
}

// alive reports whether the guest process is still running.
func (g *guestProc) alive() bool {
	select {
	case <-g.exited:
		return false
	default:
		return true
	}
}

func (g *guestProc) deadError() error {
	if g.cmd == nil {
		return fmt.Errorf("guest process pid %d exited", g.pid)
	}
	return fmt.Errorf("guest process pid %d exited (%v): %s", g.pid, g.cmd.ProcessState, bytes.TrimSpace(g.stderr.Bytes()))
}

// boundedBuffer keeps the first max bytes written to it (guest stderr).
type boundedBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - len(b.b); room > 0 {
		b.b = append(b.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (b *boundedBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]byte(nil), b.b...)
}

var errGuestGone = errors.New("sim: guest process is gone")

// Pdeathsig fires when the thread that forked the child exits, not the
// process. Go only ends a thread when a goroutine locked to it exits, but a
// caller could be such a goroutine; so guests are forked from one locked
// thread that lives as long as the agent.
var (
	spawnOnce sync.Once
	spawnReq  chan spawnRequest
)

type spawnRequest struct {
	cmd  *exec.Cmd
	done chan error
}

func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnReq = make(chan spawnRequest)
		go func() {
			runtime.LockOSThread() // never unlocked: this thread is the guests' parent
			for r := range spawnReq {
				r.done <- r.cmd.Start()
			}
		}()
	})
	r := spawnRequest{cmd: cmd, done: make(chan error, 1)}
	spawnReq <- r
	return <-r.done
}
