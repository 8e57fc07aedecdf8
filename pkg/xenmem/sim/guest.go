package sim

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// guestEnv marks a re-executed binary as a simulated guest process.
const guestEnv = "XENFERRY_SIM_GUEST"

// guestSockEnv, when set, is the path of the unix socket on which a guest
// that outlives its agent serves the next agent (see serveAgents).
const guestSockEnv = "XENFERRY_SIM_GUEST_SOCK"

// File descriptors the agent passes to the guest (cmd.ExtraFiles).
const (
	guestMemFD  = 3 // guest memory memfd
	guestCtlFD  = 4 // control page memfd
	guestSockFD = 5 // unix SOCK_SEQPACKET to the agent: hello + liveness
)

// hello is the guest's first and only message to the agent, sent with the
// userfaultfd as SCM_RIGHTS when it could be created:
//
//	off size field
//	  0    8 magic "XFSIMHLO"
//	  8    8 base address of the guest's memory mapping
//	 16    8 errno of userfaultfd creation (0 = fd attached)
//	 24    - error text, if any
var helloMagic = binary.LittleEndian.Uint64([]byte("XFSIMHLO"))

func init() {
	if os.Getenv(guestEnv) != "1" {
		return
	}
	if err := runGuest(); err != nil {
		fmt.Fprintf(os.Stderr, "xenferry sim guest: %v\n", err)
		os.Exit(2)
	}
	os.Exit(0)
}

// runGuest is the main function of a guest process: map memory and the
// control page, create the userfaultfd, hand it over, run the vCPUs until the
// agent goes away. It allocates almost nothing; GC is off so no
// stop-the-world can ever wait for a vCPU blocked in a userfaultfd fault.
func runGuest() error {
	debug.SetGCPercent(-1)
	var st unix.Stat_t
	if err := unix.Fstat(guestMemFD, &st); err != nil {
		return fmt.Errorf("fstat memory fd: %w", err)
	}
	mem, err := unix.Mmap(guestMemFD, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap memory (%d bytes): %w", st.Size, err)
	}
	// Keep dirty tracking at 4 KiB: no transparent huge pages here.
	_ = unix.Madvise(mem, unix.MADV_NOHUGEPAGE)
	raw, err := unix.Mmap(guestCtlFD, 0, ctlSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap control page: %w", err)
	}
	ctl := ctlPage(raw)
	if ctl.load64(offMagic) != controlMagic {
		return fmt.Errorf("control page has bad magic %#x", ctl.load64(offMagic))
	}
	if ctl.load64(offMemBytes) != uint64(st.Size) {
		return fmt.Errorf("control page says %d bytes of memory, memfd has %d", ctl.load64(offMemBytes), st.Size)
	}
	vcpus := int(ctl.load32(offVCPUs))
	if vcpus < 1 || vcpus > MaxVCPUs {
		return fmt.Errorf("control page says %d vcpus", vcpus)
	}
	// A vCPU blocked in a missing-page fault holds its P; leave room for the
	// others and for the liveness reader.
	runtime.GOMAXPROCS(vcpus + 2)

	// A guest of a host with a state dir listens before the hello: once
	// the agent has the hello, a successor can always reconnect.
	lfd := -1
	if p := os.Getenv(guestSockEnv); p != "" {
		if lfd, err = listenGuestSock(p); err != nil {
			return err
		}
	}

	msg := make([]byte, 24, 256)
	binary.LittleEndian.PutUint64(msg[0:], helloMagic)
	binary.LittleEndian.PutUint64(msg[8:], sliceAddr(mem))
	var oob []byte
	uffd, uerr := newUserfaultfd()
	if uerr != nil {
		errno := uint64(unix.ENOSYS)
		if e, ok := asErrno(uerr); ok {
			errno = uint64(e)
		}
		binary.LittleEndian.PutUint64(msg[16:], errno)
		msg = append(msg, uerr.Error()...)
	} else {
		oob = unix.UnixRights(uffd)
	}
	if err := unix.Sendmsg(guestSockFD, msg, oob, nil, 0); err != nil {
		return fmt.Errorf("send hello to agent: %w", err)
	}
	if uffd >= 0 && lfd < 0 {
		// The agent holds the only reference now; its lifetime is the agent's.
		unix.Close(uffd)
	}
	// Otherwise the guest keeps its userfaultfd: while it is open a vCPU
	// waiting in a missing-page fault stays blocked even with no agent
	// serving it; the kernel zero-fills only once every reference closed.

	for i := 0; i < vcpus; i++ {
		go runVCPU(mem, ctl, i)
	}
	// Liveness: the agent never writes; EOF or an error means it is gone.
	var b [8]byte
	for {
		n, err := unix.Read(guestSockFD, b[:])
		if err == unix.EINTR {
			continue
		}
		if n <= 0 || err != nil {
			break
		}
	}
	if lfd < 0 {
		return nil
	}
	serveAgents(lfd, msg, uffd)
	return nil
}

// listenGuestSock binds the guest's socket, mode 0600 (umask around bind,
// so it is never reachable by others, not even briefly).
func listenGuestSock(path string) (int, error) {
	if err := unix.Unlink(path); err != nil && err != unix.ENOENT {
		return -1, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	old := unix.Umask(0o177)
	err = unix.Bind(fd, &unix.SockaddrUnix{Name: path})
	unix.Umask(old)
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind %s: %w", path, err)
	}
	if err := unix.Listen(fd, 4); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("listen %s: %w", path, err)
	}
	return fd, nil
}

// serveAgents hands the guest's descriptors to one agent at a time: each
// accepted connection from the same user (or root) gets the hello with the
// memory memfd, the control memfd and the userfaultfd (if any) as
// SCM_RIGHTS, and owns the guest until it closes the connection; the next
// connection waits in the backlog meanwhile, so two agents never serve one
// guest at once. It never returns: the guest ends when an agent kills it.
func serveAgents(lfd int, hello []byte, uffd int) {
	fds := []int{guestMemFD, guestCtlFD}
	if uffd >= 0 {
		fds = append(fds, uffd)
	}
	oob := unix.UnixRights(fds...)
	uid := os.Getuid()
	var b [8]byte
	for {
		cfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			if err != unix.EINTR && err != unix.ECONNABORTED {
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		cred, err := unix.GetsockoptUcred(cfd, unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil || (int(cred.Uid) != uid && cred.Uid != 0) {
			unix.Close(cfd)
			continue
		}
		if err := unix.Sendmsg(cfd, hello, oob, nil, 0); err == nil {
			for {
				n, err := unix.Read(cfd, b[:])
				if err == unix.EINTR {
					continue
				}
				if n <= 0 || err != nil {
					break
				}
			}
		}
		unix.Close(cfd)
	}
}

// runVCPU is one vCPU: an OS thread running the workload at the configured
// rates, parking whenever the pause word is odd.
// vcpuNice is the nice value of the simulated vCPU threads (see runVCPU).
// Measured on web hybrid+dedup, 256 MiB, 3 runs each on the 2-core
// development VM: fault p99 11-12 ms at nice 0, 2.8-8.2 ms at 10.
const vcpuNice = 10

func runVCPU(mem []byte, ctl ctlPage, i int) {
	runtime.LockOSThread()
	// A Xen host runs dom0 ahead of its guests (dom0's vCPUs are pinned to
	// their own CPUs or carry a higher weight), so a guest that is busy
	// cannot delay the agents that serve it. Here guests and agents share
	// the machine's scheduler: a lower priority for the vCPU threads gives
	// the agents the same precedence. (Raising a nice value needs no
	// privilege.)
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), vcpuNice)
	w := ctl.workload()
	n := int(ctl.load32(offVCPUs))
	pause := ctl.u32(offPause)
	wrng := ctl.u64(vcpuOff(i, vcWRNG))
	rrng := ctl.u64(vcpuOff(i, vcRRNG))
	writes := ctl.u64(vcpuOff(i, vcWrites))
	reads := ctl.u64(vcpuOff(i, vcReads))
	parked := ctl.u32(vcpuOff(i, vcParked))
	var sink uint64

	var start time.Time
	var doneW, doneR float64
	park := func() {
		for {
			g := atomic.LoadUint32(pause)
			if g&1 == 0 {
				break
			}
			// Acknowledge this pause generation: no write is in flight.
			if atomic.LoadUint32(parked) != g {
				atomic.StoreUint32(parked, g)
				atomic.AddUint32(ctl.u32(offParkSeq), 1)
				futexWake(ctl.u32(offParkSeq))
			}
			futexWait(pause, g, int64(50*time.Millisecond))
		}
		start, doneW, doneR = time.Now(), 0, 0
	}
	park()
	var probeSeen uint32
	for {
		pg := atomic.LoadUint32(pause)
		if pg&1 != 0 {
			park()
			continue
		}
		if i == 0 {
			req := ctl.load32(offProbeReq)
			probeSeen = req
			if req != ctl.load32(offProbeAck) {
				pfn := ctl.load64(offProbePFN)
				if pfn < w.pages {
					ctl.store64(offProbeRes, fnv64(mem[pfn*4096:(pfn+1)*4096]))
				}
				ctl.store32(offProbeAck, req)
			}
		}
		wr := ctl.loadF(offWRate) / float64(n)
		rr := ctl.loadF(offRRate) / float64(n)
		el := time.Since(start).Seconds()
		// Do not burst to catch up after a long stall (e.g. a fault): keep
		// at most 50 ms of backlog.
		if lag := wr*el - doneW; lag > wr*0.05+1 {
			doneW += lag - (wr*0.05 + 1)
		}
		if lag := rr*el - doneR; lag > rr*0.05+1 {
			doneR += lag - (rr*0.05 + 1)
		}
		switch {
		case wr > 0 && doneW < wr*el:
			seq := atomic.LoadUint64(writes)
			pfn := w.pick(wrng)
			w.stamp(mem[pfn*4096:(pfn+1)*4096], i, seq)
			atomic.StoreUint64(writes, seq+1)
			doneW++
		case rr > 0 && doneR < rr*el:
			pfn := w.pick(rrng)
			sink += binary.LittleEndian.Uint64(mem[pfn*4096+(sink%512)*8:])
			atomic.AddUint64(reads, 1)
			doneR++
		default:
			next := 0.01
			if wr > 0 {
				next = min(next, (doneW+1)/wr-el)
			}
			if rr > 0 {
				next = min(next, (doneR+1)/rr-el)
			}
			d := max(time.Duration(next*float64(time.Second)), 20*time.Microsecond)
			// Sleep on a futex whose value was read before the checks
			// above, so a change since then (Pause, or a probe for vCPU 0,
			// which the agent follows with a wake on that word) cannot be
			// missed. vCPU 0 sleeps at most 1 ms so a Pause waits no
			// longer than that for it.
			if i == 0 {
				futexWait(ctl.u32(offProbeReq), probeSeen, int64(min(d, time.Millisecond)))
			} else {
				futexWait(pause, pg, int64(d))
			}
		}
	}
}

func asErrno(err error) (unix.Errno, bool) {
	var e unix.Errno
	ok := errors.As(err, &e)
	return e, ok
}
