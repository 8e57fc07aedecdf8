package engine

import (
	"testing"
	"time"
)

func round(i int, sent, dirty uint64, wire int64, d time.Duration) RoundStats {
	return RoundStats{Round: i, PagesSent: sent, DirtyPages: dirty, WireBytes: wire, Duration: d, Elapsed: time.Duration(i+1) * d}
}

func TestXenPolicy(t *testing.T) {
	cases := []struct {
		name string
		hist []RoundStats
		want Decision
	}{
		{"first round with many dirty pages continues", []RoundStats{round(0, 65536, 5000, 1<<28, time.Second)}, Continue},
		{"fewer than 50 dirty pages stops", []RoundStats{round(0, 65536, 49, 1<<28, time.Second)}, StopAndCopy},
		{"exactly 50 dirty pages continues", []RoundStats{round(0, 65536, 50, 1<<28, time.Second)}, Continue},
		{"fourth round continues", []RoundStats{round(0, 1, 900, 1, time.Second), round(1, 1, 900, 1, time.Second), round(2, 1, 900, 1, time.Second), round(3, 1, 900, 1, time.Second)}, Continue},
		{"fifth round forces stop-and-copy", []RoundStats{round(0, 1, 900, 1, time.Second), round(1, 1, 900, 1, time.Second), round(2, 1, 900, 1, time.Second), round(3, 1, 900, 1, time.Second), round(4, 1, 900, 1, time.Second)}, StopAndCopy},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := XenPolicy(PolicyInput{History: c.hist}); got.Decision != c.want {
				t.Fatalf("got %v (%s), want %v", got.Decision, got.Reason, c.want)
			}
		})
	}
}

func TestAdaptivePolicy(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name     string
		hist     []RoundStats
		postcopy bool
		timeout  time.Duration
		want     Decision
	}{
		{"dirty set fits the downtime budget stops",
			// 100 MiB/s; 256 dirty pages of 4 KiB = 1 MiB = 10 ms
			[]RoundStats{round(0, 25600, 256, 100*mib, time.Second)}, false, 0, StopAndCopy},
		{"large dirty set after first round continues",
			[]RoundStats{round(0, 65536, 20000, 256*mib, time.Second)}, false, 0, Continue},
		{"shrinking rounds continue",
			[]RoundStats{round(0, 65536, 20000, 256*mib, time.Second), round(1, 20000, 8000, 78*mib, time.Second)}, false, 0, Continue},
		{"two rounds without shrinking stop-and-copy",
			[]RoundStats{round(0, 65536, 20000, 256*mib, time.Second), round(1, 20000, 19500, 78*mib, time.Second), round(2, 19500, 19400, 76*mib, time.Second)}, false, 0, StopAndCopy},
		{"two rounds without shrinking switch to post-copy when allowed",
			[]RoundStats{round(0, 65536, 20000, 256*mib, time.Second), round(1, 20000, 19500, 78*mib, time.Second), round(2, 19500, 19400, 76*mib, time.Second)}, true, 0, SwitchToPostCopy},
		{"dirtying faster than sending gives up at once",
			[]RoundStats{round(0, 65536, 30000, 256*mib, time.Second), round(1, 30000, 31000, 117*mib, time.Second)}, true, 0, SwitchToPostCopy},
		{"completion timeout ends pre-copy",
			[]RoundStats{round(0, 65536, 20000, 256*mib, 10*time.Second)}, false, 5 * time.Second, StopAndCopy},
		{"nothing dirty stops",
			[]RoundStats{round(0, 0, 0, 0, 0)}, false, 0, StopAndCopy},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := AdaptivePolicy(PolicyInput{History: c.hist, NumPages: 65536, MaxDowntime: 300 * time.Millisecond, AllowPostCopy: c.postcopy, CompletionTimeout: c.timeout})
			if got.Decision != c.want {
				t.Fatalf("got %v (%s), want %v", got.Decision, got.Reason, c.want)
			}
			if got.Reason == "" {
				t.Fatal("verdict without a reason")
			}
		})
	}
}
