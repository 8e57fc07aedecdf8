package testlog

import (
	"os"
	"os/exec"
	"sync"
	"testing"
)

// childEnv marks the child process of TestLogAfterTheTestsEnded.
const childEnv = "TESTLOG_CHILD"

var (
	late    = make(chan struct{})
	lateLog sync.WaitGroup
)

// TestMain lets, in the child, a goroutine log through a test's logger after
// every test has ended, as controller-runtime's manager can.
func TestMain(m *testing.M) {
	code := m.Run()
	if os.Getenv(childEnv) != "" {
		close(late)
		lateLog.Wait()
	}
	os.Exit(code)
}

func TestChildStartsLateLogger(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		t.Skip("runs only in the child process")
	}
	log := New(t)
	log.Info("while the test runs")
	lateLog.Add(1)
	go func() {
		defer lateLog.Done()
		<-late
		log.Info("after every test ended")
	}()
}

// A goroutine that logs after the tests ended does not panic the test
// binary (the testing package panics on a t.Log once the test and all its
// parents have completed).
func TestLogAfterTheTestsEnded(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run", "^TestChild", "-test.count", "1")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child test binary failed: %v\n%s", err, out)
	}
}
