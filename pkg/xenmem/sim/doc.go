// Package sim is the simulated Xen host behind the xenmem interfaces.
//
// # Processes and memory
//
// A domain's guest memory is one memfd (MFD_CLOEXEC) mapped MAP_SHARED in
// the agent. Its vCPUs run in a separate guest process: the current
// executable (/proc/self/exe) re-executed with XENFERRY_SIM_GUEST=1,
// detected by an init function of this package, so every binary that
// imports sim (tests, hack/migbench, node-agent) can host guests. The guest
// maps the same memfd and a 4 KiB control memfd (workload parameters, pause
// word, per-vCPU RNG state and operation counters, all atomics), runs one
// locked OS thread per vCPU. A host without a state dir (NewHost: unit
// tests, migbench) keeps its guests from outliving it: a guest exits when
// the agent's end of its socket closes and, should the agent die, by
// Pdeathsig=SIGKILL (guests are forked from one locked thread that lives as
// long as the agent, because Pdeathsig follows the forking thread). A host
// with a state dir lets them outlive it (next section).
//
// # Surviving the agent (Options.StateDir)
//
// On a Xen dom0 the death of the toolstack or of an agent never kills a
// domU, and a restarted agent finds its domains in the hypervisor's state.
// OpenHost with Options.StateDir (the node-agent passes its --state-dir)
// does the same:
//
//   - Guests run without Pdeathsig, in their own session, stderr to
//     STATE/sim/guests/NAME.log. Before its hello a guest listens on
//     STATE/sim/guests/NAME.sock (mode 0600, bound under umask 0177). When
//     the agent's socket closes it does not exit: it accepts one agent at a
//     time (same uid or root, by SO_PEERCRED) and sends it the hello again
//     with the memory memfd, the control memfd and the userfaultfd (if any)
//     as SCM_RIGHTS; that agent owns the guest until its connection closes.
//     A guest exits only when killed (destroy: SIGKILL, through a pidfd for
//     an adopted guest, so a reused pid is never signalled).
//   - The guest keeps its own reference to the userfaultfd. A vCPU waiting
//     in a missing-page fault therefore stays blocked while no agent runs:
//     the kernel would zero-fill the page only once every reference to the
//     fd is closed (TestAgentDeathKeepsGuestsForTheNextAgent: 0 operations
//     without an agent; with the guest closing its copy the same check saw
//     the vCPU run on zero pages).
//   - Pause state lives in the control page, so a paused domain stays
//     paused across the agent's death and is reported paused after.
//   - The host keeps STATE/sim/host.json: per domain name, uuid, memory,
//     vCPUs, disks, spec, guest pid and the pid's start time (field 22 of
//     /proc/PID/stat), state, committed, and whether post-copy pages are
//     missing. It is replaced atomically (temp file, fsync, rename, fsync
//     of the directory) on every life-cycle change: create, open/close of a
//     source handle, Commit (before it returns, so before "go"; a failed
//     write fails the Commit), Reclaim, Release/Destroy, target creation,
//     target Resume (written as paused before the vCPUs run, so a crash
//     never leaves a resumed domain registered as incoming), StartLazy
//     (before any page can be missing in a running guest) and the end of a
//     post-copy. Plain Pause/Resume are not written: the control page has
//     them.
//   - OpenHost on a state dir with a registry adopts every registered
//     guest whose pid is alive with the registered start time: it opens a
//     pidfd, reconnects, maps memory and control page again (checked
//     against the registry) and restores the domain with its uuid and its
//     committed flag. A stale dirty log is switched off. A target never
//     resumed (incoming) is destroyed. A post-copy target with pages
//     missing keeps its missing-page registration, is paused as far as its
//     vCPUs can park (those blocked in a fault stay blocked) and is
//     reported Paused: the agent's restart logic destroys it through
//     OpenSource+Release and reports the half discarded. Entries whose
//     guest is gone are dropped. A guest that is alive but gives no hello
//     within 5 s (another agent serves it) fails OpenHost: forgetting it
//     would lose it.
//   - Configured domains boot only on the host's first start (no registry
//     yet), never again: not one that migrated away, nor one released.
//   - Close detaches (the guests keep running, registered) instead of
//     destroying them. Whoever needs them gone destroys them.
//
// A source handle's Release sends the guest SIGKILL before it returns and
// leaves the wait for the process, the unmapping and the closing of the
// memory file (40-90 ms at 256 MiB on the development VM) to a goroutine
// that Host.Close waits for.
//
// Socket paths must fit sun_path (108 bytes): a long state dir fails guest
// creation with a clear error.
//
// A separate process is closer to a real VM, and it keeps page faults on
// guest memory away from the agent's Go runtime: vCPU threads that block in
// a userfaultfd fault belong to the guest process, whose garbage collector
// is off, so a stop-the-world collection in the agent can never wait for a
// thread that waits for the agent's fault handler.
//
// A new domain's memory is mapped in the agent at creation
// (MADV_POPULATE_READ), as a running VM's memory is allocated, so the first
// migration round pays no page faults that only the simulation has.
//
// # Workload
//
// Each vCPU writes and reads pages at the profile's rates (paced against the
// clock, backlog capped at 50 ms). A write stamps 48 bytes at a 64-byte slot
// that cycles through the page, so a written page is neither zero nor a disk
// block. Hot-set writes (and reads) go to a contiguous run of
// hotFraction×pages pages with probability hotWriteShare. SaveState and
// LoadState carry the vCPUs' generator states and counters, so the
// destination performs exactly the writes the source would have performed
// next.
//
// Pause bumps the pause word to an odd value and wakes the vCPUs; each one
// finishes its operation, records the pause generation it parked at, bumps
// a park sequence word and futex-wakes the agent, which waits on that word
// until every vCPU has acknowledged. Parked vCPUs sleep in a futex wait.
// Measured (go test -run '^$' -bench Pause ./pkg/xenmem/sim, 2 vCPUs at
// 230 MiB/s of operations): p50 30-40 µs; p99 0.24-3 ms depending on load.
//
// # Dirty logging: userfaultfd async write-protect + PAGEMAP_SCAN
//
// The kernel here is built without CONFIG_MEM_SOFT_DIRTY: a check on a
// MAP_SHARED memfd mapping showed clear_refs accepting "4" but pagemap bit
// 55 never set again after a write, so soft-dirty is not an option.
// Instead the guest creates a userfaultfd with
// UFFD_FEATURE_WP_ASYNC|WP_UNPOPULATED|WP_HUGETLBFS_SHMEM. EnableDirtyLog
// registers the guest's mapping in write-protect mode and protects it all;
// the first write to a page then faults and the kernel resolves it by
// itself (async mode: the guest never waits for the agent), marking the
// page written. ReadDirty is one PAGEMAP_SCAN ioctl on /proc/<guest>/pagemap
// with PM_SCAN_WP_MATCHING: it returns the written pages and write-protects
// them again in the same page-table walk under the page-table lock, so it
// is atomic with respect to guest writes without pausing the vCPUs, exact
// at 4 KiB (transparent huge pages are disabled on both mappings), and
// costs time proportional to memory size plus dirty pages. Soft-dirty would
// need the vCPUs parked for every read-and-clear; synchronous uffd
// write-protect would cost the guest an agent round trip per first write.
// TestDirtyLogIsExact proves exactness: a pre-copy-style copy driven by the
// log, under 40-60 MiB/s of guest writes (also 4 vCPUs hammering 8 pages
// of an odd-sized domain), equals guest memory page for page after the
// paused final round, and the same copy without the final round does not.
//
// Measured cost per round on this 2-core VM (go test -run '^$' -bench
// ReadDirty ./pkg/xenmem/sim; numbers move with load from other work):
// 256 MiB 0.1-0.25 ms idle, 0.2 ms with ~80-110 dirty pages per round;
// 1 GiB 0.5 ms idle (1.6 ms under heavy load), 0.6-0.7 ms with ~85 dirty
// pages. With every page dirty a one-off C check of the same ioctl took
// 0.7 ms at 256 MiB and 2.6 ms at 1 GiB.
//
// # Lazy loading (post-copy)
//
// The guest creates its userfaultfd at start-up and hands it to the agent
// at once over its socket (SCM_RIGHTS), with its mapping's base address;
// the agent registers and unregisters the guest's range itself, since every
// userfaultfd ioctl acts on the address space of the process that created
// the fd. One fd thus serves both dirty logging (write-protect mode) and
// lazy loading (missing mode), so a domain that arrived lazily can be
// migrated on.
//
// StartLazy registers the range in missing mode, so exactly the pages
// absent from the memfd's page cache fault. It first reads page-cache
// residency (mincore) and punches out the missing pages that still have a
// (stale) copy there. Present pages the page cache lacks are zero pages
// never written on this host; they are zero-filled in the background after
// StartLazy returns (StartLazy is part of the downtime), and a vCPU that
// touches one first faults and has it zero-filled on the spot by the
// service loop, never reported as a Fault. StartLazy of 1 GiB with 20% of
// the pages missing, half of them stale and scattered (a pessimistic case),
// took 70 ms, nearly all of it hole punching; with nothing stale it is one
// mincore call.
//
// A service goroutine, locked to its OS thread and made SCHED_FIFO where
// the kernel allows (postcopy.PinRealtime), blocks in poll(2) on the
// userfaultfd and an eventfd that stops it, reads uffd_msg batches and
// hands each xenmem.Fault to the handler set with SetFaultHandler (by type
// assertion: the engine sends its demand request from this thread, which
// the kernel woke for the fault) or, without one, on a bounded channel.
// Install is
// UFFDIO_COPY and InstallZero UFFDIO_ZEROPAGE, both atomic per page and
// both waking the waiting vCPUs; EEXIST (the page is already there, e.g.
// the guest wrote it after an earlier install) becomes
// xenmem.ErrPageExists, so a late push never overwrites guest data. Faults
// interrupted by a signal are raised again, so Faults may repeat a pfn; the
// guest runs with asynchronous preemption off to make that rare. Lazy's
// PresentBitmap (by type assertion) gives the received bitmap for
// post-copy recovery.
//
// Measured (go test -run '^$' -bench 'Lazy|Probe' ./pkg/xenmem/sim): a
// guest writing 8 MiB/s over all-missing memory, every fault served by
// Install: fault read → page installed p50 17 µs, p99 83 µs
// (BenchmarkLazyFaults). A 1 GiB all-missing domain running the migbench
// "web" workload while one goroutine pushes every page and another serves
// faults, no network (BenchmarkLazyFaultsUnderPush): fault p50 4-7 µs, p99
// 0.12-0.16 ms, ~3100 demand pages, push 0.6-0.7 s, workload at full
// speed. A vCPU read of a missing page until the read completes: p50 10 µs
// (BenchmarkProbeMissingPage; its ms-scale p99 is the harness's polling on
// two shared cores).
//
// # Privileges
//
// userfaultfd is created with UFFD_USER_MODE_ONLY, which this kernel allows
// without privilege; PAGEMAP_SCAN on another process's pagemap needs ptrace
// access (same user or root). The package's tests pass as root and as an
// unprivileged user here; where userfaultfd is unavailable they skip with
// the reason, and a guest without it still runs (dirty logging and lazy
// loading then return xenmem.ErrNotSupported).
//
// Extras for tests and benchmarks: Domain.Probe makes vCPU 0 read a page
// through the guest's own mapping (a real guest access, faulting if
// missing), Domain.Counters and Ops count the workload, Domain.SetRates
// changes the rates of a running domain.
package sim
