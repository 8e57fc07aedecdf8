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

// TestAdaptivePolicyCheckpoints: the decisions taken on live figures, in
// a round or at its end: stop-and-copy when the rest fits the budget with
// the switch-over's cost, post-copy only when it saves a clear margin.
func TestAdaptivePolicyCheckpoints(t *testing.T) {
	const mb = 1e6
	in := func(checkpoint, postcopy bool, restMB, wire, dirty float64, switchCost time.Duration) PolicyInput {
		return PolicyInput{NumPages: 65536, MaxDowntime: 40 * time.Millisecond, AllowPostCopy: postcopy, Checkpoint: checkpoint,
			RemainingBytes: int64(restMB * mb), RemainingPages: uint64(restMB * mb / 4096), WireRate: wire * mb, DirtyRate: dirty * mb,
			SwitchCost: switchCost}
	}
	hist := []RoundStats{round(0, 65536, 800, 40<<20, 300*time.Millisecond)}
	cases := []struct {
		name string
		in   PolicyInput
		want Decision
	}{
		{"idle mid-round: 40 MB to go at 1 MB/s dirtied, pre-copy goes on", in(true, true, 40, 125, 1, 10*time.Millisecond), Continue},
		{"web mid-round: 105 MB to go at 30 MB/s dirtied, post-copy saves 0.26 s", in(true, true, 105, 125, 30, 10*time.Millisecond), SwitchToPostCopy},
		{"web mid-round without post-copy goes on", in(true, false, 105, 125, 30, 10*time.Millisecond), Continue},
		{"pagecache mid-round: 50 MB at 10 MB/s saves 35 ms < margin", in(true, true, 50, 125, 10, 10*time.Millisecond), Continue},
		{"memheavy: dirtying faster than the link switches at once", in(true, true, 200, 125, 190, 10*time.Millisecond), SwitchToPostCopy},
		{"rest fits: 3 MB = 24 ms + 10 ms switch ≤ 40 ms", in(true, true, 3, 125, 10, 10*time.Millisecond), StopAndCopy},
		{"rest fits but the first pass is not done: finish it live", func() PolicyInput {
			p := in(true, true, 3, 125, 10, 10*time.Millisecond)
			p.UnsentPages = 100
			return p
		}(), Continue},
		{"rest fits the data but not with the switch cost", in(true, true, 3, 125, 10, 20*time.Millisecond), Continue},
		{"round end: 4 MB at 125 MB/s after a 300 ms round goes on", func() PolicyInput {
			p := in(false, false, 4, 125, 3, 10*time.Millisecond)
			p.History = hist
			return p
		}(), Continue},
		{"round end, post-copy allowed, small gain: one more round", func() PolicyInput {
			p := in(false, true, 4, 125, 3, 10*time.Millisecond)
			p.History = hist
			return p
		}(), Continue},
		{"checkpoint past the completion timeout switches", func() PolicyInput {
			p := in(true, true, 100, 125, 5, 10*time.Millisecond)
			p.CompletionTimeout, p.Elapsed = time.Second, 2*time.Second
			return p
		}(), SwitchToPostCopy},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := AdaptivePolicy(c.in)
			if got.Decision != c.want {
				t.Fatalf("got %v (%s), want %v", got.Decision, got.Reason, c.want)
			}
			if got.Reason == "" {
				t.Fatal("verdict without a reason")
			}
		})
	}
}

func TestXenPolicyIgnoresCheckpoints(t *testing.T) {
	if v := XenPolicy(PolicyInput{Checkpoint: true, RemainingBytes: 1}); v.Decision != Continue {
		t.Fatalf("got %v at a checkpoint, want continue", v.Decision)
	}
}

func TestPresetPlans(t *testing.T) {
	for _, s := range Strategies {
		p, ok := PresetPlan(s)
		if !ok || p.Validate() != nil || p.String() != string(s) {
			t.Fatalf("preset %s: %+v ok=%v string=%s", s, p, ok, p.String())
		}
	}
	if _, err := resolvePlan(Options{Strategy: StrategyXen, Plan: Plan{Policy: PolicyXen, PostCopy: PostCopyNever}}); err == nil {
		t.Fatal("strategy and plan both set: want an error")
	}
	if p, err := resolvePlan(Options{}); err != nil || p.String() != string(DefaultStrategy) {
		t.Fatalf("empty options: %v %v, want the default preset", p, err)
	}
	if _, err := resolvePlan(Options{Plan: Plan{Policy: "fastest", PostCopy: PostCopyNever}}); err == nil {
		t.Fatal("unknown policy: want an error")
	}
}
