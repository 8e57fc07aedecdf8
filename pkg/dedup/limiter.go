package dedup

import (
	"context"
	"fmt"

	"golang.org/x/time/rate"
)

// limiter paces index reads to a byte rate: a golang.org/x/time/rate bucket
// whose burst is one second of reads. A nil limiter does not limit.
type limiter struct {
	rl    *rate.Limiter
	burst int
}

func newLimiter(bytesPerSec int64) *limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	burst := int(min(bytesPerSec, int64(1<<30)))
	return &limiter{rl: rate.NewLimiter(rate.Limit(bytesPerSec), burst), burst: burst}
}

// wait blocks until n more bytes may be read, or ctx is done.
func (l *limiter) wait(ctx context.Context, n int) error {
	if l == nil {
		return ctx.Err()
	}
	// rate.Limiter refuses single requests above its burst; a larger read is
	// paid in burst-sized parts, which charges the same total.
	for n > 0 {
		part := min(n, l.burst)
		if err := l.rl.WaitN(ctx, part); err != nil {
			return waitErr(ctx, err)
		}
		n -= part
	}
	return nil
}

// waitErr gives a failed wait the context's error. rate.Limiter refuses up
// front a wait that would outlast ctx's deadline; that is reported as the
// deadline passing, which is what waiting would have come to.
func waitErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return fmt.Errorf("read pacing: %w (%w)", context.DeadlineExceeded, err)
}
