package engine

import (
	"context"
	"sync"
	"testing"
	"time"
)

// TestLimiterHoldsRate sends from four goroutines through one bucket and
// checks that the achieved rate is within 5% of the cap.
func TestLimiterHoldsRate(t *testing.T) {
	const rate = 40 << 20 // 40 MiB/s
	l := newLimiter(rate)
	ctx := context.Background()
	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < 500*time.Millisecond {
				if err := l.take(ctx, 256<<10); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				total += 256 << 10
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	got := float64(total) / time.Since(start).Seconds()
	if got > rate*1.05 || got < rate*0.5 {
		t.Fatalf("rate %.1f MiB/s, want at most 40 MiB/s +5%%", got/(1<<20))
	}
}

func TestLimiterPriorityDebt(t *testing.T) {
	l := newLimiter(10 << 20)
	l.takeNow(5 << 20) // half a second of debt
	start := time.Now()
	if err := l.take(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("background traffic did not pay back priority debt: waited %v", d)
	}
}

func TestLimiterCancel(t *testing.T) {
	l := newLimiter(1 << 10)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.take(ctx, 1<<20); err == nil {
		t.Fatal("take on a cancelled context succeeded")
	}
}
