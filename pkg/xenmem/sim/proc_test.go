package sim

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// processGone reports whether pid no longer runs (absent or a zombie).
func processGone(pid int) bool {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// State is the field after the parenthesised command name.
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z' || s[i+2] == 'X'
}

// TestHelperAgent is not a test: TestGuestDiesWithItsAgent runs it in a child
// process as a throw-away agent.
func TestHelperAgent(t *testing.T) {
	if os.Getenv("XENFERRY_SIM_TEST_AGENT") != "1" {
		t.Skip("helper process for TestGuestDiesWithItsAgent")
	}
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "4Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 1}})
	fmt.Printf("GUEST %d\n", mustDomain(t, h, "vm").PID())
	time.Sleep(time.Minute)
}

func TestGuestDiesWithItsAgent(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperAgent$", "-test.v")
	cmd.Env = append(os.Environ(), "XENFERRY_SIM_TEST_AGENT=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	pid := 0
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "GUEST %d", &pid); err == nil {
			break
		}
	}
	if pid == 0 {
		t.Fatal("helper agent did not report its guest")
	}
	if processGone(pid) {
		t.Fatalf("guest %d is not running", pid)
	}
	_ = cmd.Process.Kill() // SIGKILL: the agent gets no chance to clean up
	_ = cmd.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("guest %d still runs 5 s after its agent was killed", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
