package engine

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/time/rate"
)

// limiter is the bandwidth cap shared by every stream of a migration: bytes
// put on the wire draw tokens from one golang.org/x/time/rate bucket, with a
// burst of about one record so the long-run rate holds to the cap.
//
// Priority traffic (demand pages, switch-over control records) reserves its
// tokens without waiting: the reservation drives the bucket into debt that
// background traffic then pays back. The cap holds over time, and demand
// never queues behind background pages.
type limiter struct {
	rl    *rate.Limiter // nil: unlimited
	burst int
}

func newLimiter(bytesPerSec int64) *limiter {
	if bytesPerSec <= 0 {
		return &limiter{}
	}
	// One maximal record plus a little: small enough that the cap holds
	// within a few percent over a second.
	burst := max(int(bytesPerSec/50), 512<<10)
	rl := rate.NewLimiter(rate.Limit(bytesPerSec), burst)
	// Start empty: a migration's first second is paced like every other,
	// rather than opening with a burst above the cap.
	rl.ReserveN(time.Now(), burst)
	return &limiter{rl: rl, burst: burst}
}

// take blocks until n bytes may be sent (background traffic), or ctx ends.
func (l *limiter) take(ctx context.Context, n int) error {
	if l == nil || l.rl == nil {
		return nil
	}
	// rate.Limiter refuses single requests above its burst; a large record
	// is paid in burst-sized parts, which charges the same total.
	for n > 0 {
		part := min(n, l.burst)
		if err := l.rl.WaitN(ctx, part); err != nil {
			return waitErr(ctx, err)
		}
		n -= part
	}
	return nil
}

// takeNow charges n bytes without waiting (priority traffic): the
// reservations are kept, not cancelled, so the debt they leave delays the
// background traffic that follows.
func (l *limiter) takeNow(n int) {
	if l == nil || l.rl == nil {
		return
	}
	now := time.Now()
	for n > 0 {
		part := min(n, l.burst)
		l.rl.ReserveN(now, part)
		n -= part
	}
}

// waitErr gives a failed wait the context's error. rate.Limiter refuses up
// front a wait that would outlast ctx's deadline; that is reported as the
// deadline passing, which is what waiting would have come to.
func waitErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return fmt.Errorf("bandwidth cap: %w (%w)", context.DeadlineExceeded, err)
}
