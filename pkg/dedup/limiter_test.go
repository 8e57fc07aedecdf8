package dedup

import (
	"context"
	"testing"
	"time"
)

// TestLimiterPaces: after the one-second burst, reads are held to the rate;
// a read larger than the burst is paid in full, and cancellation ends a wait.
func TestLimiterPaces(t *testing.T) {
	l := newLimiter(4 << 20)
	ctx := context.Background()
	if err := l.wait(ctx, 4<<20); err != nil { // the burst: immediate
		t.Fatal(err)
	}
	start := time.Now()
	if err := l.wait(ctx, 2<<20); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 400*time.Millisecond || d > 2*time.Second {
		t.Fatalf("2 MiB after the burst at 4 MiB/s took %v, want about 500ms", d)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := l.wait(cctx, 8<<20); err == nil {
		t.Fatal("wait on a cancelled context succeeded")
	}
	if newLimiter(0) != nil {
		t.Fatal("a zero rate must not limit")
	}
}
