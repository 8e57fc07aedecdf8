package engine

import (
	"context"
	"errors"
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

// TestLimiterPriorityNeverWaits: demand answers are charged but never held,
// however deep the bucket's debt, and a record larger than the burst is
// paid in full by background traffic.
func TestLimiterPriorityNeverWaits(t *testing.T) {
	l := newLimiter(1 << 20)
	l.takeNow(8 << 20) // eight seconds of debt
	start := time.Now()
	for range 100 {
		l.takeNow(64 << 10)
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Fatalf("priority traffic waited %v behind the debt", d)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := l.take(ctx, 1)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("background take during 14 s of debt: err %v, want DeadlineExceeded", err)
	}

	big := newLimiter(4 << 20) // burst 512 KiB
	start = time.Now()
	if err := big.take(context.Background(), 2<<20); err != nil {
		t.Fatalf("take above the burst: %v", err)
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("2 MiB at 4 MiB/s took %v, want about 500ms", d)
	}
}

func TestLimiterUnlimited(t *testing.T) {
	l := newLimiter(0)
	l.takeNow(1 << 30)
	if err := l.take(context.Background(), 1<<30); err != nil {
		t.Fatal(err)
	}
}
