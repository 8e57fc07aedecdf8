package engine

import (
	"context"
	"sync/atomic"

	"github.com/xenferry/xenferry/pkg/pace"
)

// limiter is the bandwidth cap shared by every stream of a migration: bytes
// put on the wire draw tokens from one pace.Bucket, with a
// burst of about one record so the long-run rate holds to the cap.
//
// Priority traffic (demand pages, switch-over control records) reserves its
// tokens without waiting: the reservation drives the bucket into debt that
// background traffic then pays back. The cap holds over time, and demand
// never queues behind background pages.
type limiter struct {
	b *pace.Bucket // nil: unlimited
	// debt is priority bytes not yet charged to b: the next background
	// take pays them. Priority sends thus never take the bucket's lock,
	// which a push sender may hold while the kernel runs something else
	// (a real-time demand thread parked on it waits for the scheduler).
	debt atomic.Int64
}

func newLimiter(bytesPerSec int64) *limiter {
	// One maximal record plus a little: small enough that the cap holds
	// within a few percent over a second. Start empty: a migration's
	// first second is paced like every other, rather than opening with a
	// burst above the cap.
	burst := max(int(bytesPerSec/50), 512<<10)
	return &limiter{b: pace.New(bytesPerSec, burst, true, "bandwidth cap")}
}

// take blocks until n bytes may be sent (background traffic), or ctx ends.
func (l *limiter) take(ctx context.Context, n int) error {
	if l == nil || l.b == nil {
		return nil
	}
	return l.b.Wait(ctx, n+int(l.debt.Swap(0)))
}

// takeNow charges n bytes without waiting (priority traffic).
func (l *limiter) takeNow(n int) {
	if l == nil || l.b == nil {
		return
	}
	l.debt.Add(int64(n))
}
