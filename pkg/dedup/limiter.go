package dedup

import (
	"context"
	"sync"
	"time"
)

// limiter paces reads to a byte rate (a token bucket with a burst of one
// second). A nil limiter does not limit.
type limiter struct {
	rate float64 // bytes per second

	mu   sync.Mutex // mu protects next.
	next time.Time  // when the bytes granted so far have been paid for
}

func newLimiter(bytesPerSec int64) *limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	return &limiter{rate: float64(bytesPerSec)}
}

// wait blocks until n more bytes may be read, or ctx is done.
func (l *limiter) wait(ctx context.Context, n int) error {
	if l == nil {
		return ctx.Err()
	}
	l.mu.Lock()
	now := time.Now()
	if floor := now.Add(-time.Second); l.next.Before(floor) {
		l.next = floor // allow a burst of at most one second
	}
	l.next = l.next.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	d := l.next.Sub(now)
	l.mu.Unlock()
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
