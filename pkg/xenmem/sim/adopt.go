package sim

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Options are a host's settings that do not come from its YAML definition.
type Options struct {
	// StateDir makes the host behave like a Xen host towards its agent:
	// guests outlive the process that created them, the host keeps a
	// registry of its domains under STATEDIR/sim, and a host opened again
	// on the same StateDir adopts the guests still alive instead of
	// booting its configured domains again (those boot only on the first
	// start). Close detaches from the guests instead of destroying them.
	// Empty: guests die with the process (Pdeathsig), nothing persists,
	// the configured domains boot at every start.
	StateDir string
}

// OpenHost creates or re-opens a host (see Options.StateDir).
func OpenHost(cfg Config, opts Options, log logr.Logger) (_ *Host, retErr error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("sim host %s: %w", cfg.Name, err)
	}
	capacity, _ := ParseBytes(cfg.Memory)
	h := &Host{
		cfg:      cfg,
		capacity: capacity,
		stateDir: opts.StateDir,
		log:      log.WithValues("host", cfg.Name),
		domains:  map[string]*Domain{},
		reserved: map[string]uint64{},
		nextID:   1,
	}
	if h.stateDir != "" {
		abs, err := filepath.Abs(h.stateDir)
		if err != nil {
			return nil, fmt.Errorf("sim host %s: state dir: %w", cfg.Name, err)
		}
		h.stateDir = abs
	}
	defer func() {
		if retErr != nil {
			h.Close()
		}
	}()
	first := true
	if h.stateDir != "" {
		if err := os.MkdirAll(filepath.Join(h.simDir(), "guests"), 0o700); err != nil {
			return nil, fmt.Errorf("sim host %s: %w", cfg.Name, err)
		}
		reg, ok, err := loadRegistry(h.registryPath())
		if err != nil {
			return nil, fmt.Errorf("sim host %s: %w", cfg.Name, err)
		}
		if ok && reg.Host != cfg.Name {
			return nil, fmt.Errorf("sim host %s: state dir %s holds the domains of host %q: give each host its own state dir", cfg.Name, h.stateDir, reg.Host)
		}
		if ok {
			first = false
			if err := h.adoptAll(reg); err != nil {
				return nil, fmt.Errorf("sim host %s: %w", cfg.Name, err)
			}
		}
	}
	if first {
		for _, spec := range cfg.Domains {
			if _, err := h.CreateDomain(context.Background(), spec); err != nil {
				return nil, fmt.Errorf("sim host %s: %w", cfg.Name, err)
			}
		}
	}
	if err := h.persist(); err != nil {
		return nil, err
	}
	return h, nil
}

// adoptAll takes over every registered guest still alive and forgets the
// others. A guest that is alive but does not answer is an error: another
// agent may still serve it, and forgetting it would lose it.
func (h *Host) adoptAll(reg registry) error {
	for _, e := range reg.Domains {
		d, err := h.adopt(e)
		if errors.Is(err, errGuestGone) {
			h.log.Info("Dropped a registered domain whose guest is gone", "domain", e.Name, "guestPID", e.PID, "reason", err.Error())
			_ = os.Remove(h.guestSock(e.Name))
			continue
		}
		if err != nil {
			return fmt.Errorf("adopt domain %s: %w", e.Name, err)
		}
		if e.State == xenmem.StateIncoming {
			// Never resumed: nothing half-created stays.
			d.destroy()
			h.log.Info("Destroyed an incoming domain a previous agent never resumed", "domain", e.Name)
			continue
		}
		h.mu.Lock()
		d.id = h.nextID
		h.nextID++
		h.domains[e.Name] = d
		h.mu.Unlock()
		d.log.Info("Adopted domain", "domain", e.Name, "guestPID", d.guest.pid, "state", d.state, "committed", d.committed, "pagesMissing", d.lazyPending)
	}
	return nil
}

// adoptTimeout bounds the wait for a guest's hello on reconnection.
const adoptTimeout = 5 * time.Second

// adopt reconnects to one registered guest and rebuilds its domain.
func (h *Host) adopt(e regEntry) (_ *Domain, retErr error) {
	var spec DomainSpec
	if err := json.Unmarshal(e.Config, &spec); err != nil {
		return nil, fmt.Errorf("registered config: %w", err)
	}
	if spec.Name != e.Name || !nameRE.MatchString(e.Name) || e.MemoryBytes == 0 || e.MemoryBytes%xenmem.PageSize != 0 ||
		spec.VCPUs < 1 || spec.VCPUs > MaxVCPUs {
		return nil, fmt.Errorf("registered entry is inconsistent (name %q/%q, %d bytes, %d vcpus)", e.Name, spec.Name, e.MemoryBytes, spec.VCPUs)
	}
	g, memFile, ctlFile, err := connectGuest(h.guestSock(e.Name), e.PID, e.PIDStart)
	if err != nil {
		return nil, err
	}
	d := &Domain{host: h, log: h.log, spec: spec, disks: e.Disks, npages: e.MemoryBytes / xenmem.PageSize,
		uuid: e.UUID, memFile: memFile, ctlFile: ctlFile, guest: g, state: e.State, committed: e.Committed, lazyPending: e.Lazy}
	defer func() {
		if retErr != nil {
			g.detach()
			d.unmapFiles()
		}
	}()
	st, err := memFile.Stat()
	if err != nil || uint64(st.Size()) != e.MemoryBytes {
		return nil, fmt.Errorf("guest pid %d: memory is not the registered %d bytes (%v)", e.PID, e.MemoryBytes, err)
	}
	if d.mem, err = unix.Mmap(int(memFile.Fd()), 0, int(e.MemoryBytes), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("map guest memory: %w", err)
	}
	_ = unix.Madvise(d.mem, unix.MADV_NOHUGEPAGE)
	raw, err := unix.Mmap(int(ctlFile.Fd()), 0, ctlSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map control page: %w", err)
	}
	d.ctl = ctlPage(raw)
	if d.ctl.load64(offMagic) != controlMagic || d.ctl.load64(offMemBytes) != e.MemoryBytes || int(d.ctl.load32(offVCPUs)) != spec.VCPUs {
		return nil, fmt.Errorf("guest pid %d: control page does not match the registry", e.PID)
	}
	if e.State == xenmem.StateIncoming {
		return d, nil // destroyed by the caller
	}
	if g.uffd >= 0 {
		if e.Lazy {
			// Missing pages stay registered: a vCPU touching one waits
			// (for a destroy) rather than read a zero page. Any
			// write-protect registration of a dead dirty log is dropped.
			if err := d.setRegistration(uffdRegisterModeMissing); err != nil {
				return nil, fmt.Errorf("keep missing pages registered: %w", err)
			}
		} else {
			// A dirty log the dead agent left on is switched off.
			d.regMode = uffdRegisterModeWP
			if err := d.setRegistration(0); err != nil {
				return nil, fmt.Errorf("drop a stale dirty log: %w", err)
			}
		}
	}
	pw := d.ctl.u32(offPause)
	if e.Lazy && atomic.LoadUint32(pw)&1 == 0 {
		// A post-copy domain whose page server died can never complete:
		// park what can park and report it paused, for the agent's
		// restart logic to destroy it (vCPUs blocked in a fault stay so).
		atomic.AddUint32(pw, 1)
		futexWake(pw)
		futexWake(d.ctl.u32(offProbeReq))
	}
	d.paused = atomic.LoadUint32(pw)&1 != 0
	switch {
	case d.paused:
		d.state = xenmem.StatePaused
	default:
		d.state = xenmem.StateRunning
	}
	return d, nil
}

// connectGuest reconnects to a guest that outlived its agent: the pid must
// still be the registered process (start time), and its socket must hand
// over the memory memfd, the control memfd and the userfaultfd. A guest
// that is gone gives an error wrapping errGuestGone.
func connectGuest(path string, pid int, start uint64) (_ *guestProc, mem, ctl *os.File, retErr error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("guest pid %d: %w (%v)", pid, errGuestGone, err)
	}
	g := &guestProc{pid: pid, pidfd: pidfd, sock: -1, uffd: -1, exited: make(chan struct{}), quit: make(chan struct{}), stderr: &boundedBuffer{max: 1}}
	closeAll := func(fds []int) {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	defer func() {
		if retErr != nil {
			if g.sock >= 0 {
				unix.Close(g.sock)
			}
			if g.uffd >= 0 {
				unix.Close(g.uffd)
			}
			if g.pagemap != nil {
				g.pagemap.Close()
			}
			unix.Close(pidfd)
		}
	}()
	// The pidfd pins the process: a start time read after opening it
	// that matches the registry proves it is the registered guest.
	if st, err := procStartTime(pid); err != nil || st != start {
		return nil, nil, nil, fmt.Errorf("guest pid %d: %w (start time %d, registered %d, %v)", pid, errGuestGone, st, start, err)
	}
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("socket: %w", err)
	}
	g.sock = sock
	if err := unix.Connect(sock, &unix.SockaddrUnix{Name: path}); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED) {
			// The socket file goes only with the guest.
			if !pidAlive(pidfd) {
				return nil, nil, nil, fmt.Errorf("guest pid %d: %w", pid, errGuestGone)
			}
		}
		return nil, nil, nil, fmt.Errorf("guest pid %d is alive but its socket %s refuses: %w", pid, path, err)
	}
	// The guest answers one agent at a time: no hello in time means
	// another agent process still serves it.
	pfd := []unix.PollFd{{Fd: int32(sock), Events: unix.POLLIN}}
	deadline := time.Now().Add(adoptTimeout)
	for {
		n, err := unix.Poll(pfd, 100)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, nil, nil, fmt.Errorf("guest pid %d: poll: %w", pid, err)
		}
		if n > 0 {
			break
		}
		if !pidAlive(pidfd) {
			return nil, nil, nil, fmt.Errorf("guest pid %d: %w", pid, errGuestGone)
		}
		if time.Now().After(deadline) {
			return nil, nil, nil, fmt.Errorf("guest pid %d gave no hello within %v: is another agent serving it?", pid, adoptTimeout)
		}
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(3*4))
	n, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("guest pid %d: read hello: %w", pid, err)
	}
	var fds []int
	if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for i := range msgs {
			if r, err := unix.ParseUnixRights(&msgs[i]); err == nil {
				fds = append(fds, r...)
			}
		}
	}
	if n < 24 || binary.LittleEndian.Uint64(buf) != helloMagic || len(fds) < 2 || len(fds) > 3 {
		closeAll(fds)
		return nil, nil, nil, fmt.Errorf("guest pid %d: bad hello (%d bytes, %d descriptors)", pid, n, len(fds))
	}
	g.base = binary.LittleEndian.Uint64(buf[8:])
	if errno := binary.LittleEndian.Uint64(buf[16:]); errno != 0 {
		g.uffdErr = fmt.Errorf("guest pid %d has no userfaultfd: %s", pid, buf[24:n])
		if len(fds) != 2 {
			closeAll(fds)
			return nil, nil, nil, fmt.Errorf("guest pid %d: hello without userfaultfd carries %d descriptors", pid, len(fds))
		}
	} else if len(fds) != 3 {
		closeAll(fds)
		return nil, nil, nil, fmt.Errorf("guest pid %d: hello carries %d descriptors, want 3", pid, len(fds))
	} else {
		g.uffd = fds[2]
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		closeAll(fds[:2])
		return nil, nil, nil, fmt.Errorf("guest pid %d: %w", pid, err)
	}
	g.pagemap = pm
	g.start = start
	go g.watchPidfd()
	return g, os.NewFile(uintptr(fds[0]), "memfd:adopted"), os.NewFile(uintptr(fds[1]), "memfd-ctl:adopted"), nil
}

// pidAlive reports whether the process behind pidfd still runs.
func pidAlive(pidfd int) bool {
	pfd := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 0)
	return err != nil || n == 0
}

// watchPidfd closes exited when the adopted guest exits, and the pidfd
// once the guest is released (kill or detach).
func (g *guestProc) watchPidfd() {
	pfd := []unix.PollFd{{Fd: int32(g.pidfd), Events: unix.POLLIN}}
	for {
		if n, err := unix.Poll(pfd, 100); err == nil && n > 0 {
			close(g.exited)
			<-g.quit
			unix.Close(g.pidfd)
			return
		}
		select {
		case <-g.quit: // detached: the guest lives on
			unix.Close(g.pidfd)
			return
		default:
		}
	}
}

// detach drops the agent's hold on the domain and leaves its guest
// running (and registered). Idempotent with destroy.
func (d *Domain) detach() {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !d.letGo(false) { // the uffd registration stays: the guest keeps it
		return
	}
	if d.guest != nil {
		d.guest.detach()
	}
	d.unmapFiles()
	d.mem, d.ctl = nil, nil
	d.log.Info("Detached from domain; its guest keeps running", "domain", d.spec.Name, "guestPID", d.guest.pid)
}
