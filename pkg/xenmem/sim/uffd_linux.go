package sim

// Every raw syscall, ioctl number and kernel structure the sim backend uses
// lives in this file (gVisor style). golang.org/x/sys/unix does not define the
// userfaultfd or PAGEMAP_SCAN interfaces, so they are spelled out here from
// include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h (Linux 6.7+).

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers: _IOWR(0xAA, nr, size) and friends, checked against the C
// headers with a one-off program (see TestIoctlStructSizes for the sizes).
const (
	uffdioAPI          = 0xc018aa3f // _IOWR(UFFDIO, 0x3F, struct uffdio_api)
	uffdioRegister     = 0xc020aa00 // _IOWR(UFFDIO, 0x00, struct uffdio_register)
	uffdioUnregister   = 0x8010aa01 // _IOR(UFFDIO, 0x01, struct uffdio_range)
	uffdioWake         = 0x8010aa02 // _IOR(UFFDIO, 0x02, struct uffdio_range)
	uffdioCopy         = 0xc028aa03 // _IOWR(UFFDIO, 0x03, struct uffdio_copy)
	uffdioZeropage     = 0xc020aa04 // _IOWR(UFFDIO, 0x04, struct uffdio_zeropage)
	uffdioWriteprotect = 0xc018aa06 // _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)
	pagemapScan        = 0xc0606610 // _IOWR('f', 16, struct pm_scan_arg)
)

const (
	uffdAPI = 0xAA

	uffdUserModeOnly = 1 // userfaultfd(2) flag: only user-mode faults (allowed unprivileged)

	uffdFeatureMissingShmem   = 1 << 5
	uffdFeatureWPHugetlbShmem = 1 << 12
	uffdFeatureWPUnpopulated  = 1 << 13
	uffdFeatureWPAsync        = 1 << 15

	uffdRegisterModeMissing = 1
	uffdRegisterModeWP      = 2

	uffdWriteprotectModeWP = 1

	uffdEventPagefault     = 0x12
	uffdPagefaultFlagWrite = 1

	pmScanWPMatching   = 1 << 0
	pmScanCheckWPAsync = 1 << 1
	pageIsWritten      = 1 << 1

	uffdMsgSize = 32

	// futex(2) operations, shared (not FUTEX_PRIVATE_FLAG): the futex word
	// is in a memfd mapped by the agent and the guest.
	futexWaitOp = 0
	futexWakeOp = 1
)

// guestUffdFeatures are requested by the guest when it creates its
// userfaultfd: shmem missing faults (lazy loading) and asynchronous
// write-protect on shmem including never-populated ptes (dirty logging).
const guestUffdFeatures = uffdFeatureMissingShmem | uffdFeatureWPHugetlbShmem | uffdFeatureWPUnpopulated | uffdFeatureWPAsync

type uffdioAPIArg struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

type uffdioRange struct {
	Start uint64
	Len   uint64
}

type uffdioRegisterArg struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

type uffdioCopyArg struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

type uffdioZeropageArg struct {
	Range    uffdioRange
	Mode     uint64
	Zeropage int64
}

type uffdioWriteprotectArg struct {
	Range uffdioRange
	Mode  uint64
}

type pmScanArg struct {
	Size              uint64
	Flags             uint64
	Start             uint64
	End               uint64
	WalkEnd           uint64
	Vec               uint64
	VecLen            uint64
	MaxPages          uint64
	CategoryInverted  uint64
	CategoryMask      uint64
	CategoryAnyofMask uint64
	ReturnMask        uint64
}

type pageRegion struct {
	Start      uint64
	End        uint64
	Categories uint64
}

func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer) (uintptr, unix.Errno) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if e == unix.EINTR {
			continue
		}
		return r, e
	}
}

// newUserfaultfd creates a userfaultfd for the calling process and enables the
// features the guest needs. Runs in the guest process.
func newUserfaultfd() (int, error) {
	r, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK|uffdUserModeOnly, 0, 0)
	if e != 0 {
		return -1, fmt.Errorf("userfaultfd(2): %w (needs root, vm.unprivileged_userfaultfd=1 or kernel support for UFFD_USER_MODE_ONLY)", e)
	}
	fd := int(r)
	api := uffdioAPIArg{API: uffdAPI, Features: guestUffdFeatures}
	if _, e := ioctlPtr(fd, uffdioAPI, unsafe.Pointer(&api)); e != 0 {
		unix.Close(fd)
		return -1, fmt.Errorf("UFFDIO_API features %#x: %w (kernel 6.7+ with shmem write-protect needed)", guestUffdFeatures, e)
	}
	return fd, nil
}

func uffdRegister(fd int, start, length, mode uint64) error {
	arg := uffdioRegisterArg{Range: uffdioRange{start, length}, Mode: mode}
	if _, e := ioctlPtr(fd, uffdioRegister, unsafe.Pointer(&arg)); e != 0 {
		return fmt.Errorf("UFFDIO_REGISTER mode %#x: %w", mode, e)
	}
	return nil
}

func uffdUnregister(fd int, start, length uint64) error {
	arg := uffdioRange{start, length}
	if _, e := ioctlPtr(fd, uffdioUnregister, unsafe.Pointer(&arg)); e != 0 {
		return fmt.Errorf("UFFDIO_UNREGISTER: %w", e)
	}
	return nil
}

func uffdWriteprotect(fd int, start, length uint64, protect bool) error {
	arg := uffdioWriteprotectArg{Range: uffdioRange{start, length}}
	if protect {
		arg.Mode = uffdWriteprotectModeWP
	}
	for {
		_, e := ioctlPtr(fd, uffdioWriteprotect, unsafe.Pointer(&arg))
		if e == unix.EAGAIN {
			continue
		}
		if e != 0 {
			return fmt.Errorf("UFFDIO_WRITEPROTECT %v: %w", protect, e)
		}
		return nil
	}
}

func uffdZeropage(fd int, dst, length uint64) unix.Errno {
	arg := uffdioZeropageArg{Range: uffdioRange{dst, length}}
	for {
		e := uffdZeropageArg(fd, &arg)
		if e != unix.EAGAIN {
			return e
		}
	}
}

// uffdZeropageArg zero-fills arg.Range once; on return arg.Zeropage holds
// the bytes filled before an error (EEXIST stops at the first present page,
// EAGAIN asks to retry from there).
func uffdZeropageArg(fd int, arg *uffdioZeropageArg) unix.Errno {
	arg.Zeropage = 0
	_, e := ioctlPtr(fd, uffdioZeropage, unsafe.Pointer(arg))
	return e
}

// mincore fills vec with one byte per page of b; bit 0 says whether the
// page is in memory (for a shared file mapping: in the page cache).
func mincore(b []byte, vec []byte) error {
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return e
	}
	return nil
}

// pagemapScanWritten reports, through fn, the ranges of [start,end) written
// since they were last write-protected and write-protects them again, in one
// page-table walk (PAGEMAP_SCAN with PM_SCAN_WP_MATCHING). vec bounds the
// regions per call; the walk continues from walk_end when vec fills.
func pagemapScanWritten(pagemapFD int, start, end uint64, vec []pageRegion, fn func(start, end uint64)) error {
	for start < end {
		arg := pmScanArg{
			Size:         uint64(unsafe.Sizeof(pmScanArg{})),
			Flags:        pmScanWPMatching | pmScanCheckWPAsync,
			Start:        start,
			End:          end,
			Vec:          uint64(uintptr(unsafe.Pointer(&vec[0]))),
			VecLen:       uint64(len(vec)),
			CategoryMask: pageIsWritten,
			ReturnMask:   pageIsWritten,
		}
		n, e := ioctlPtr(pagemapFD, pagemapScan, unsafe.Pointer(&arg))
		if e != 0 {
			return fmt.Errorf("PAGEMAP_SCAN: %w", e)
		}
		for i := 0; i < int(n); i++ {
			fn(vec[i].Start, vec[i].End)
		}
		if arg.WalkEnd <= start {
			return errors.New("PAGEMAP_SCAN made no progress")
		}
		start = arg.WalkEnd
	}
	return nil
}

// futexWait sleeps while *addr == val (shared futex: the word lives in a
// MAP_SHARED memfd mapped by two processes), at most timeoutNs.
func futexWait(addr *uint32, val uint32, timeoutNs int64) {
	ts := unix.NsecToTimespec(timeoutNs)
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(addr)), futexWaitOp, uintptr(val), uintptr(unsafe.Pointer(&ts)), 0, 0)
}

// futexWake wakes every waiter on addr.
func futexWake(addr *uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(addr)), futexWakeOp, uintptr(1<<30), 0, 0, 0)
}

// bytesAt returns a pointer into a mapping (control page words).
func wordAt32(b []byte, off int) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
func wordAt64(b []byte, off int) *uint64 { return (*uint64)(unsafe.Pointer(&b[off])) }

// sliceAddr is the virtual address of a mapping in this process.
func sliceAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

// killZero checks whether a process exists (kill(pid, 0)).
func killZero(pid int) error { return unix.Kill(pid, 0) }

// monoNow is CLOCK_MONOTONIC in nanoseconds (the clock of Fault.RaisedNanos).
func monoNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}
