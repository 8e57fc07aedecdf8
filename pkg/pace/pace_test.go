package pace

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A request larger than the burst is paid in parts and still passes; a
// wait that cannot end before ctx's deadline fails at once with
// DeadlineExceeded; a nil bucket never waits.
func TestBucket(t *testing.T) {
	b := New(1<<20, 64<<10, false, "test cap")
	if err := b.Wait(context.Background(), 96<<10); err != nil {
		t.Fatalf("a request above the burst: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	err := b.Wait(ctx, 4<<20) // 4 s at 1 MiB/s
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a wait past the deadline: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(t0); d > time.Second {
		t.Errorf("the refused wait took %v", d)
	}
	var none *Bucket
	none.Charge(1 << 30)
	if err := none.Wait(context.Background(), 1<<30); err != nil {
		t.Fatalf("nil bucket: %v", err)
	}
	if New(0, 1, true, "off") != nil {
		t.Error("a zero rate must mean no bucket")
	}
}
