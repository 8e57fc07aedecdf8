package dedup

import (
	"context"

	"github.com/xenferry/xenferry/pkg/pace"
)

// limiter paces index reads to a byte rate: a pace.Bucket whose burst is
// one second of reads. A nil limiter does not limit.
type limiter struct {
	b *pace.Bucket
}

func newLimiter(bytesPerSec int64) *limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	return &limiter{b: pace.New(bytesPerSec, int(min(bytesPerSec, int64(1<<30))), false, "read pacing")}
}

// wait blocks until n more bytes may be read, or ctx is done.
func (l *limiter) wait(ctx context.Context, n int) error {
	if l == nil {
		return ctx.Err()
	}
	return l.b.Wait(ctx, n)
}
