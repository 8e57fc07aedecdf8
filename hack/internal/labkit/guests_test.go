package labkit

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// A fake guest: this test binary re-executed as "xenferry-sim-guest
// domain=NAME" with a memory file as fd 3 and a control page as fd 4, as
// an agent starts a sim guest. It sleeps until killed.
func TestMain(m *testing.M) {
	if os.Getenv("LABKIT_FAKE_GUEST") == "1" {
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestObserveGuest(t *testing.T) {
	dir := t.TempDir()
	mem := bytes.Repeat([]byte{1, 2, 3, 4}, 4*PageSize/4)
	ctl := make([]byte, PageSize)
	le := binary.LittleEndian
	copy(ctl, ctlMagic)
	le.PutUint32(ctl[ctlOffVCPUs:], 2)
	le.PutUint32(ctl[ctlOffPause:], 3) // odd: paused
	le.PutUint64(ctl[ctlOffMemBytes:], uint64(len(mem)))
	le.PutUint64(ctl[ctlOffWRate:], math.Float64bits(12.5))
	le.PutUint64(ctl[ctlOffHotStart:], 1)
	le.PutUint64(ctl[ctlOffHotPages:], 2)
	le.PutUint64(ctl[ctlOffVCPU0+ctlVCWrites:], 5)
	le.PutUint64(ctl[ctlOffVCPU0+ctlVCPUStride+ctlVCWrites:], 7)
	open := func(name string, b []byte) *os.File {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	stderr, err := os.Create(filepath.Join(dir, "guest.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	domain := "labkit-test-" + filepath.Base(dir)
	cmd := &exec.Cmd{Path: self, Args: []string{GuestArgv0, "domain=" + domain}, Env: append(os.Environ(), "LABKIT_FAKE_GUEST=1"),
		Stderr: stderr, ExtraFiles: []*os.File{open("mem", mem), open("ctl", ctl)}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()

	var gs []Guest
	for deadline := time.Now().Add(10 * time.Second); len(gs) == 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		gs = FindGuests(func(g Guest) bool { return g.Domain == domain })
	}
	if len(gs) != 1 {
		t.Fatalf("found %d guests of %s, want 1", len(gs), domain)
	}
	g := gs[0]
	if g.PID != cmd.Process.Pid || g.Start == 0 || g.NetNS == 0 || g.Stderr != stderr.Name() {
		t.Errorf("guest %+v: want pid %d, a start time, a netns and stderr %s", g, cmd.Process.Pid, stderr.Name())
	}
	v, err := ReadCtl(g.PID)
	if err != nil {
		t.Fatal(err)
	}
	want := CtlView{VCPUs: 2, PauseWord: 3, Paused: true, MemBytes: uint64(len(mem)), WriteRate: 12.5, HotStart: 1, HotPages: 2, Writes: 12}
	if v != want {
		t.Errorf("ReadCtl = %+v, want %+v", v, want)
	}
	got, err := ReadMemory(g.PID)
	if err != nil || !bytes.Equal(got, mem) {
		t.Errorf("ReadMemory: %d bytes, err %v; want the %d bytes of the memory file", len(got), err, len(mem))
	}
	if n := len(FindGuests(func(g Guest) bool { return g.Domain == domain && g.NetNS != gs[0].NetNS })); n != 0 {
		t.Errorf("keep was not applied: %d guests", n)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if n := len(FindGuests(func(g Guest) bool { return g.Domain == domain })); n != 0 {
		t.Errorf("a reaped guest is still found (%d)", n)
	}
}
