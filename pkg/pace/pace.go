// Package pace paces byte streams to a rate with golang.org/x/time/rate:
// requests larger than the bucket's burst are paid in burst-sized parts,
// and charges that must not wait drive the bucket into debt that waiting
// callers then pay back. A nil *Bucket does not limit.
package pace

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/time/rate"
)

// Bucket is a byte-rate token bucket.
type Bucket struct {
	rl    *rate.Limiter
	burst int
	what  string // names the cap in errors ("bandwidth cap", "read pacing")
}

// New returns a bucket of bytesPerSec with the given burst, or nil when
// bytesPerSec <= 0 (no limit). startEmpty makes the first second paced
// like every other instead of opening with a full burst.
func New(bytesPerSec int64, burst int, startEmpty bool, what string) *Bucket {
	if bytesPerSec <= 0 {
		return nil
	}
	burst = max(burst, 1)
	rl := rate.NewLimiter(rate.Limit(bytesPerSec), burst)
	if startEmpty {
		rl.ReserveN(time.Now(), burst)
	}
	return &Bucket{rl: rl, burst: burst, what: what}
}

// Wait blocks until n bytes may pass, or ctx ends. rate.Limiter refuses up
// front a wait that would outlast ctx's deadline; that is reported as the
// deadline passing, which is what waiting would have come to.
func (b *Bucket) Wait(ctx context.Context, n int) error {
	if b == nil {
		return ctx.Err()
	}
	for n > 0 {
		part := min(n, b.burst)
		if err := b.rl.WaitN(ctx, part); err != nil {
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
			return fmt.Errorf("%s: %w (%w)", b.what, context.DeadlineExceeded, err)
		}
		n -= part
	}
	return nil
}

// Charge takes n bytes without waiting. The reservations are kept, not
// cancelled, so the debt they leave delays the Waits that follow: the rate
// holds over time while the charged traffic never queues.
func (b *Bucket) Charge(n int) {
	if b == nil {
		return
	}
	now := time.Now()
	for n > 0 {
		part := min(n, b.burst)
		b.rl.ReserveN(now, part)
		n -= part
	}
}
