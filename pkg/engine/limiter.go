package engine

import (
	"context"
	"sync"
	"time"
)

// limiter is a token bucket shared by every stream of a migration: bytes put
// on the wire draw tokens at rate bytes/s, with a burst of one record so the
// long-run rate holds to the cap. Priority traffic (demand pages) takes its
// tokens without waiting, driving the bucket into debt that background
// traffic then pays back: the cap holds, and demand never queues behind it.
type limiter struct {
	rate  float64 // bytes per second; 0 = unlimited
	burst float64

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func newLimiter(bytesPerSec int64) *limiter {
	l := &limiter{rate: float64(bytesPerSec), last: time.Now()}
	// One maximal record plus a little: small enough that the cap holds
	// within a few percent over a second.
	l.burst = max(l.rate/50, 512<<10)
	l.tokens = 0
	return l
}

// take blocks until n bytes may be sent (background traffic).
func (l *limiter) take(ctx context.Context, n int) error {
	if l == nil || l.rate == 0 {
		return nil
	}
	l.mu.Lock()
	l.refill()
	l.tokens -= float64(n)
	wait := time.Duration(0)
	if l.tokens < 0 {
		wait = time.Duration(-l.tokens / l.rate * float64(time.Second))
	}
	l.mu.Unlock()
	if wait <= 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// takeNow charges n bytes without waiting (priority traffic).
func (l *limiter) takeNow(n int) {
	if l == nil || l.rate == 0 {
		return
	}
	l.mu.Lock()
	l.refill()
	l.tokens -= float64(n)
	l.mu.Unlock()
}

func (l *limiter) refill() {
	now := time.Now()
	l.tokens += now.Sub(l.last).Seconds() * l.rate
	l.last = now
	if l.tokens > l.burst {
		l.tokens = l.burst
	}
}
