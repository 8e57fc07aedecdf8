package engine

import (
	"fmt"
	"time"
)

// Decision is what a pre-copy policy tells the engine to do next.
type Decision int

const (
	// Continue runs another pre-copy round over the dirty pages.
	Continue Decision = iota
	// StopAndCopy pauses the domain and sends what is left.
	StopAndCopy
	// SwitchToPostCopy pauses the domain, resumes it at the destination and
	// pushes what is left afterwards.
	SwitchToPostCopy
	// Abort gives up; the domain keeps running on the source.
	Abort
)

func (d Decision) String() string {
	switch d {
	case Continue:
		return "continue"
	case StopAndCopy:
		return "stop-and-copy"
	case SwitchToPostCopy:
		return "post-copy"
	case Abort:
		return "abort"
	}
	return fmt.Sprintf("decision(%d)", int(d))
}

// RoundStats describes one finished pre-copy round and the state after it.
type RoundStats struct {
	// Round is the 0-based index of the round that just ended.
	Round int
	// PagesSent is how many pages the round sent (in any form).
	PagesSent uint64
	// WireBytes is what the round put on the wire.
	WireBytes int64
	// Duration is the round's wall time.
	Duration time.Duration
	// DirtyPages is how many pages were dirtied during the round (the next
	// round's work).
	DirtyPages uint64
	// Elapsed is the time since the migration started.
	Elapsed time.Duration
}

// PolicyInput is everything a policy may look at. Policies are pure
// functions of it: same input, same verdict.
type PolicyInput struct {
	History []RoundStats // every round so far, oldest first; never empty
	// NumPages is the domain's size in pages.
	NumPages uint64
	// MaxDowntime is the downtime budget.
	MaxDowntime time.Duration
	// AllowPostCopy lets the policy switch to post-copy.
	AllowPostCopy bool
	// CompletionTimeout bounds pre-copy (0: none).
	CompletionTimeout time.Duration
}

// Verdict is a decision with its reason, for logs, status and the benchmark.
type Verdict struct {
	Decision Decision
	Reason   string
}

// Policy decides after every pre-copy round.
type Policy func(in PolicyInput) Verdict

// Constants of stock libxc's simple_precopy_policy (xg_sr_save.c).
const (
	xenMaxIterations    = 5
	xenTargetDirtyCount = 50
)

// XenPolicy replicates stock Xen (libxc's simple pre-copy policy): stop when
// fewer than 50 pages are dirty or after 5 live rounds (the first sending
// every page), whatever the downtime this costs. It never aborts and knows no
// post-copy.
func XenPolicy(in PolicyInput) Verdict {
	last := in.History[len(in.History)-1]
	if last.DirtyPages < xenTargetDirtyCount {
		return Verdict{StopAndCopy, fmt.Sprintf("%d dirty pages < %d", last.DirtyPages, xenTargetDirtyCount)}
	}
	if last.Round+1 >= xenMaxIterations {
		return Verdict{StopAndCopy, fmt.Sprintf("forced after %d rounds", last.Round+1)}
	}
	return Verdict{Continue, "iterating"}
}

// Tunables of the adaptive policy.
const (
	// adaptiveMaxRounds caps pre-copy whatever else happens.
	adaptiveMaxRounds = 30
	// shrinkFactor: a round that leaves more than this share of the
	// previous round's dirty pages did not shrink the work.
	shrinkFactor = 0.9
	// stallRounds rounds in a row without shrinking end pre-copy.
	stallRounds = 2
)

// AdaptivePolicy stops as soon as the remaining dirty data fits the downtime
// budget at the bandwidth measured in the last round, and stops early once
// rounds stop shrinking the dirty set (the workload dirties memory about as
// fast as the link drains it). When it stops without converging it switches
// to post-copy if allowed; otherwise it stops and copies, and the downtime is
// what it is (reported, never hidden). A completion timeout ends pre-copy the
// same way.
func AdaptivePolicy(in PolicyInput) Verdict {
	h := in.History
	last := h[len(h)-1]
	notConverging := func(why string) Verdict {
		if in.AllowPostCopy {
			return Verdict{SwitchToPostCopy, why}
		}
		return Verdict{StopAndCopy, why}
	}
	// Estimated time to send what is dirty, at this round's wire cost per
	// page and rate.
	if last.PagesSent > 0 && last.Duration > 0 && last.WireBytes > 0 {
		perPage := float64(last.WireBytes) / float64(last.PagesSent)
		rate := float64(last.WireBytes) / last.Duration.Seconds()
		est := time.Duration(float64(last.DirtyPages) * perPage / rate * float64(time.Second))
		if est <= in.MaxDowntime {
			return Verdict{StopAndCopy, fmt.Sprintf("converged: %d dirty pages ≈ %v ≤ budget %v", last.DirtyPages, est.Round(time.Millisecond), in.MaxDowntime)}
		}
	} else if last.DirtyPages == 0 {
		return Verdict{StopAndCopy, "converged: nothing dirty"}
	}
	if in.CompletionTimeout > 0 && last.Elapsed >= in.CompletionTimeout {
		return notConverging(fmt.Sprintf("completion timeout %v reached", in.CompletionTimeout))
	}
	if last.Round+1 >= adaptiveMaxRounds {
		return notConverging(fmt.Sprintf("round cap %d reached", adaptiveMaxRounds))
	}
	// Rounds after the first only resend dirty pages; compare their sizes.
	stalled := 0
	for i := len(h) - 1; i >= 1 && stalled < stallRounds; i-- {
		if float64(h[i].DirtyPages) > shrinkFactor*float64(h[i-1].DirtyPages) {
			stalled++
		} else {
			break
		}
	}
	if stalled >= stallRounds {
		return notConverging(fmt.Sprintf("not converging: dirty set %d → %d pages over the last rounds", h[len(h)-1-stalled].DirtyPages, last.DirtyPages))
	}
	// The first round is all of memory; if the workload dirtied at least
	// as much as a round can carry the set cannot shrink.
	if len(h) >= 2 && last.DirtyPages >= last.PagesSent && last.PagesSent > 0 {
		return notConverging(fmt.Sprintf("not converging: dirtied %d pages while sending %d", last.DirtyPages, last.PagesSent))
	}
	return Verdict{Continue, "shrinking"}
}

// PolicyFor returns the policy a strategy runs.
func PolicyFor(s Strategy) Policy {
	if s == StrategyXen {
		return XenPolicy
	}
	return AdaptivePolicy
}

// switchesEarly reports whether a strategy may end pre-copy inside a round
// to resume early at the destination.
func (s Strategy) switchesEarly() bool { return s == StrategyHybrid || s == StrategyHybridDedup }

// usesDedup reports whether a strategy sends disk references.
func (s Strategy) usesDedup() bool { return s == StrategyPreCopyDedup || s == StrategyHybridDedup }

// allowsPostCopy reports whether a strategy may end in post-copy.
func (s Strategy) allowsPostCopy() bool {
	return s == StrategyPostCopy || s == StrategyHybrid || s == StrategyHybridDedup
}

// Valid reports whether s names a known strategy.
func (s Strategy) Valid() bool {
	for _, k := range Strategies {
		if s == k {
			return true
		}
	}
	return false
}
