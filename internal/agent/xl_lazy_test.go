package agent

import (
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// TestReadyGateHoldsXLsReadyUntilThePagerIsSetUp: the gate runs once, after
// the whole "ready" message was read (even split across reads) and before
// any byte of it is handed on; a gate error ends the relay there.
func TestReadyGateHoldsXLsReadyUntilThePagerIsSetUp(t *testing.T) {
	out := "xl migration receiver ready, send binary domain data.\n" + string(readyMessage) + "my copy unpause results are as follows\x00\x00"
	for _, fail := range []bool{false, true} {
		calls := 0
		var relayed strings.Builder
		g := &readyGate{r: iotest.OneByteReader(strings.NewReader(out)), gate: func() error {
			calls++
			if strings.Contains(relayed.String(), "domain received") {
				t.Error("part of the ready message was relayed before the gate")
			}
			if fail {
				return errors.New("evict failed")
			}
			return nil
		}}
		buf := make([]byte, 7)
		var err error
		for {
			var n int
			n, err = g.Read(buf)
			relayed.Write(buf[:n])
			if err != nil {
				break
			}
		}
		if calls != 1 {
			t.Fatalf("gate ran %d times", calls)
		}
		switch {
		case fail && (errors.Is(err, io.EOF) || strings.Contains(relayed.String(), "domain received")):
			t.Fatalf("failed gate: relayed %q, err %v", relayed.String(), err)
		case !fail && (!errors.Is(err, io.EOF) || relayed.String() != out):
			t.Fatalf("relayed %q (err %v), want everything", relayed.String(), err)
		}
	}
	if !earlyResumeStrategy("hybrid+dedup") || !earlyResumeStrategy("postcopy") || earlyResumeStrategy("precopy+dedup") {
		t.Fatal("earlyResumeStrategy misreads the engine strategies")
	}
}
