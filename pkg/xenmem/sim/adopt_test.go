package sim

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"
	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

const adoptEnv = "XENFERRY_SIM_TEST_ADOPT"

func adoptConfig(dir string) Config {
	dom := func(name string, seed int64) DomainSpec {
		return DomainSpec{Name: name, Memory: "8Mi", VCPUs: 1,
			Profile: Profile{Zero: 0.3, DirtyMiBps: 2, ReadMiBps: 2, Seed: seed}}
	}
	return Config{Name: "adopt", Memory: "1Gi", CPUs: 2, StateDir: dir,
		Domains: []DomainSpec{dom("run", 1), dom("held", 2), dom("away", 3)}}
}

// memHash hashes all of a domain's memory through its memory file.
func memHash(t testing.TB, sd interface {
	NumPages() uint64
	ReadPages(uint64, []byte) error
}) uint64 {
	t.Helper()
	buf := make([]byte, sd.NumPages()*xenmem.PageSize)
	if err := sd.ReadPages(0, buf); err != nil {
		t.Fatal(err)
	}
	return fnv64(buf)
}

// TestHelperAdoptAgent is not a test: TestAgentDeathKeepsGuestsForTheNextAgent
// runs it in a child process as an agent that is then SIGKILLed. It leaves
// a running domain (run), a committed paused source (held), a released
// one (away), a target never resumed (inc) and a resumed post-copy target
// with every page missing (lazy).
func TestHelperAdoptAgent(t *testing.T) {
	dir := os.Getenv(adoptEnv)
	if dir == "" {
		t.Skip("helper process for TestAgentDeathKeepsGuestsForTheNextAgent")
	}
	ctx := ctxT(t)
	h, err := OpenHost(adoptConfig(dir), Options{StateDir: dir}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	held, err := h.OpenSource(ctx, "held")
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := held.Commit(); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("HELD %d\n", memHash(t, held))
	away, err := h.OpenSource(ctx, "away")
	if err != nil {
		t.Fatal(err)
	}
	if err := away.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := away.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := away.Release(); err != nil {
		t.Fatal(err)
	}
	info := mustDomain(t, h, "run").Info()
	info.Name, info.UUID = "inc", ""
	if _, err := h.CreateTarget(ctx, info); err != nil {
		t.Fatal(err)
	}
	info.Name = "lazy"
	lt, err := h.CreateTarget(ctx, info)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lt.StartLazy(xenmem.NewBitmap(lt.NumPages())); err != nil {
		t.Fatal(err)
	}
	if err := lt.Resume(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"run", "held", "inc", "lazy"} {
		d := mustDomain(t, h, name)
		fmt.Printf("GUEST %s %d %s\n", name, d.PID(), d.Info().UUID)
	}
	fmt.Println("READY")
	time.Sleep(time.Minute)
}

// guestOps reads a guest's operation counters through its control page,
// reached via /proc (no agent involved).
func guestOps(t *testing.T, pid, vcpus int) uint64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/fd/%d", pid, guestCtlFD))
	if err != nil {
		t.Fatalf("guest %d control page: %v", pid, err)
	}
	defer f.Close()
	raw, err := unix.Mmap(int(f.Fd()), 0, ctlSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(raw)
	c := ctlPage(raw)
	var n uint64
	for i := 0; i < vcpus; i++ {
		n += c.load64(vcpuOff(i, vcWrites)) + c.load64(vcpuOff(i, vcReads))
	}
	return n
}

func domainNames(t *testing.T, h *Host) []string {
	t.Helper()
	doms, err := h.Domains(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range doms {
		names = append(names, d.Name+"="+string(d.State))
	}
	sort.Strings(names)
	return names
}

func TestAgentDeathKeepsGuestsForTheNextAgent(t *testing.T) {
	requiresUffd(t)
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperAdoptAgent$", "-test.v")
	cmd.Env = append(os.Environ(), adoptEnv+"="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	pids, uuids := map[string]int{}, map[string]string{}
	var heldHash uint64
	ready := false
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var name, uuid string
		var pid int
		if _, err := fmt.Sscanf(sc.Text(), "GUEST %s %d %s", &name, &pid, &uuid); err == nil {
			pids[name], uuids[name] = pid, uuid
		}
		fmt.Sscanf(sc.Text(), "HELD %d", &heldHash)
		if sc.Text() == "READY" {
			ready = true
			break
		}
	}
	if !ready {
		t.Fatal("helper agent did not get ready")
	}
	t.Cleanup(func() {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL) // whatever the test left
		}
	})
	_ = cmd.Process.Kill() // SIGKILL: no chance to clean up
	_ = cmd.Wait()
	go func() { _, _ = bufio.NewReader(out).ReadString(0) }()

	// With no agent at all: every guest lives on; run runs, held stays
	// paused, and lazy's vCPU stays blocked on its missing page (a zero
	// page installed by the kernel would let it count operations).
	time.Sleep(100 * time.Millisecond)
	for name, pid := range pids {
		if processGone(pid) {
			t.Fatalf("guest %s (pid %d) died with its agent", name, pid)
		}
	}
	run0, held0, lazy0 := guestOps(t, pids["run"], 1), guestOps(t, pids["held"], 1), guestOps(t, pids["lazy"], 1)
	time.Sleep(400 * time.Millisecond)
	if run1 := guestOps(t, pids["run"], 1); run1 <= run0 {
		t.Fatalf("run's guest did not progress without its agent: %d -> %d ops", run0, run1)
	}
	if held1 := guestOps(t, pids["held"], 1); held1 != held0 {
		t.Fatalf("held (paused) ran without its agent: %d -> %d ops", held0, held1)
	}
	if lazy1 := guestOps(t, pids["lazy"], 1); lazy1 != 0 || lazy0 != 0 {
		t.Fatalf("lazy's vCPU got past its missing page without an agent: %d -> %d ops", lazy0, lazy1)
	}

	// The next agent adopts them.
	h, err := OpenHost(adoptConfig(dir), Options{StateDir: dir}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	got := strings.Join(domainNames(t, h), " ")
	if want := "held=Paused lazy=Paused run=Running"; got != want {
		t.Fatalf("adopted domains %q, want %q (inc destroyed, away not booted again)", got, want)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !processGone(pids["inc"]) {
		if time.Now().After(deadline) {
			t.Fatalf("the never-resumed target's guest %d still runs", pids["inc"])
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, name := range []string{"run", "held", "lazy"} {
		d := mustDomain(t, h, name)
		if d.PID() != pids[name] || d.Info().UUID != uuids[name] {
			t.Fatalf("%s: pid %d uuid %s, want the original %d %s", name, d.PID(), d.Info().UUID, pids[name], uuids[name])
		}
	}
	ctx := ctxT(t)

	// held: still committed and paused, memory as it was at the commit.
	heldD := mustDomain(t, h, "held")
	if !heldD.Committed() || !heldD.Paused() {
		t.Fatalf("held: committed %v paused %v after adoption, want both", heldD.Committed(), heldD.Paused())
	}
	hs, err := h.OpenSource(ctx, "held")
	if err != nil {
		t.Fatal(err)
	}
	if got := memHash(t, hs); got != heldHash {
		t.Fatalf("held's memory changed across the agent's death")
	}
	if err := hs.Resume(); !errors.Is(err, xenmem.ErrCommitted) {
		t.Fatalf("resume of the adopted committed domain: %v, want ErrCommitted", err)
	}
	if err := hs.Close(); err != nil {
		t.Fatal(err)
	}
	if !heldD.Paused() {
		t.Fatal("closing a handle resumed the adopted committed domain")
	}

	// lazy: still blocked; the agent's restart logic destroys it through
	// the xenmem interfaces (as adoptResumedTarget does).
	time.Sleep(200 * time.Millisecond)
	if n := mustDomain(t, h, "lazy").Ops(); n != 0 {
		t.Fatalf("lazy ran %d ops after adoption", n)
	}
	ls, err := h.OpenSource(ctx, "lazy")
	if err != nil {
		t.Fatal(err)
	}
	if err := ls.Release(); err != nil {
		t.Fatal(err)
	}
	ls.Close()
	deadline = time.Now().Add(5 * time.Second)
	for !processGone(pids["lazy"]) {
		if time.Now().After(deadline) {
			t.Fatalf("lazy's guest %d survived its release", pids["lazy"])
		}
		time.Sleep(10 * time.Millisecond)
	}

	// run: alive under the new agent, then migrated with memory intact.
	runD := mustDomain(t, h, "run")
	o0 := runD.Ops()
	time.Sleep(200 * time.Millisecond)
	if runD.Ops() <= o0 {
		t.Fatal("adopted run does not progress")
	}
	dst := newTestHost(t)
	src, err := h.OpenSource(ctx, "run")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatalf("dirty log on an adopted domain: %v", err)
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	tgt, err := dst.CreateTarget(ctx, src.Info())
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	n := src.NumPages()
	buf := make([]byte, n*xenmem.PageSize)
	if err := src.ReadPages(0, buf); err != nil {
		t.Fatal(err)
	}
	pfns := make([]uint64, n)
	for i := range pfns {
		pfns[i] = uint64(i)
	}
	if err := tgt.WritePages(pfns, buf); err != nil {
		t.Fatal(err)
	}
	st, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if err := tgt.LoadState(st); err != nil {
		t.Fatal(err)
	}
	if err := src.Commit(); err != nil {
		t.Fatal(err)
	}
	if fnv64(tgt.Memory()) != fnv64(runD.Memory()) {
		t.Fatal("destination memory differs from the adopted source's at switch-over")
	}
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := src.Release(); err != nil {
		t.Fatal(err)
	}
	dd := mustDomain(t, dst, "run")
	time.Sleep(200 * time.Millisecond)
	if dd.Ops() <= o0 {
		t.Fatalf("migrated domain does not continue the workload: %d ops, had %d", dd.Ops(), o0)
	}

	// A third start: only held is left; nothing configured boots again.
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if processGone(pids["held"]) {
		t.Fatal("closing a host with a state dir killed its guest")
	}
	h3, err := OpenHost(adoptConfig(dir), Options{StateDir: dir}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer h3.Close()
	if got := strings.Join(domainNames(t, h3), " "); got != "held=Paused" {
		t.Fatalf("third start has %q, want only held=Paused", got)
	}
	if d := mustDomain(t, h3, "held"); !d.Committed() {
		t.Fatal("held lost its committed flag on the second adoption")
	}
	// The agent's verdict: reclaim, then destroy to end the test cleanly.
	hs3, err := h3.OpenSource(ctx, "held")
	if err != nil {
		t.Fatal(err)
	}
	if err := hs3.Reclaim("test"); err != nil {
		t.Fatal(err)
	}
	hs3.Close()
	mustDomain(t, h3, "held").destroy()
	h3.remove(mustDomain(t, h3, "held"))
}

// Close of a host with a state dir leaves its guests running; a guest that
// dies while no agent runs is dropped on the next start, and its domain is
// not booted again from the configuration.
func TestStateDirHostDetachesAndDropsDeadGuests(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Name: "detach", Memory: "1Gi", CPUs: 2, StateDir: dir,
		Domains: []DomainSpec{{Name: "vm", Memory: "4Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 1}}}}
	h, err := OpenHost(cfg, Options{StateDir: dir}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	pid := mustDomain(t, h, "vm").PID()
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	fi, err := os.Stat(h.guestSock("vm"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("guest socket: %v, mode %v, want 0600", err, fi.Mode())
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if processGone(pid) {
		t.Fatal("Close of a host with a state dir killed its guest")
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			t.Fatal("guest survived SIGKILL")
		}
		time.Sleep(10 * time.Millisecond)
	}
	h2, err := OpenHost(cfg, Options{StateDir: dir}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close()
	if got := domainNames(t, h2); len(got) != 0 {
		t.Fatalf("domains after the guest died: %v, want none (not booted again)", got)
	}
	reg, ok, err := loadRegistry(h2.registryPath())
	if err != nil || !ok || len(reg.Domains) != 0 {
		t.Fatalf("registry after dropping the dead guest: %+v %v %v", reg, ok, err)
	}
	// Without a state dir nothing is kept: the configured domain boots.
	h3, err := NewHost(cfg, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer h3.Close()
	if got := domainNames(t, h3); len(got) != 1 {
		t.Fatalf("a host without a state dir has %v, want its configured domain", got)
	}
}

// A state dir belongs to one host: another host refuses it rather than
// adopting (or killing) guests it does not own.
func TestStateDirBelongsToOneHost(t *testing.T) {
	dir := t.TempDir()
	h, err := OpenHost(Config{Name: "one", Memory: "1Gi", CPUs: 2}, Options{StateDir: dir}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	_, err = OpenHost(Config{Name: "two", Memory: "1Gi", CPUs: 2}, Options{StateDir: dir}, testlog.New(t))
	if err == nil || !strings.Contains(err.Error(), `holds the domains of host "one"`) {
		t.Fatalf("second host on the same state dir: %v, want a refusal", err)
	}
}
