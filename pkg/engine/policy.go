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
//
// The engine asks after every round and, for the adaptive policy, at
// checkpoints inside a round (Checkpoint set): the dirty log is read at
// each, so the remaining work and the dirty rate are current.
type PolicyInput struct {
	History []RoundStats // every finished round, oldest first; empty at a checkpoint of round 0
	// NumPages is the domain's size in pages.
	NumPages uint64
	// MaxDowntime is the downtime budget.
	MaxDowntime time.Duration
	// AllowPostCopy lets the policy switch to post-copy.
	AllowPostCopy bool
	// CompletionTimeout bounds pre-copy (0: none).
	CompletionTimeout time.Duration

	// Checkpoint: the round has not ended; the fields below describe now.
	Checkpoint bool
	// Elapsed is the time since the migration started.
	Elapsed time.Duration
	// RemainingBytes estimates the wire bytes of every page still to
	// send (pages never sent at the cost per page measured so far, pages
	// sent and dirtied since as full pages); RemainingPages counts them.
	RemainingBytes int64
	RemainingPages uint64
	// UnsentPages of them were never sent (the first pass is not done).
	UnsentPages uint64
	// WireRate is the measured rate of the wire (bytes/s); DirtyRate the
	// rate at which the guest turns sent pages into pages to send again
	// (bytes/s, distinct pages), over the last interval. Zero: unknown.
	WireRate  float64
	DirtyRate float64
	// SwitchCost is the part of a downtime that is not page data: the
	// final dirty log, vCPU state, manifest and round trips.
	SwitchCost time.Duration
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
	if in.Checkpoint || len(in.History) == 0 {
		return Verdict{Continue, "iterating"} // libxc decides at round ends only
	}
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
	// postCopyMargin: post-copy must finish at least this much sooner
	// than more pre-copy would before the policy takes it. A post-copy
	// costs what a time estimate does not show: the guest waits for the
	// pages it touches first, and until the push ends the domain needs
	// both hosts.
	postCopyMargin = 50 * time.Millisecond
	// postCopyShare: ... and at least this share of the rest's wire time.
	postCopyShare = 0.05
)

// AdaptivePolicy decides at round ends and at checkpoints inside rounds:
//
//  1. Stop-and-copy once the rest fits the downtime budget: its wire time
//     at the measured rate plus the switch-over's fixed cost.
//  2. With post-copy allowed, post-copy once it finishes sooner than more
//     pre-copy would, by postCopyMargin (and postCopyShare): pre-copy
//     sends the rest and then again what the guest dirties meanwhile, a
//     geometric series, Rest/(WireRate-DirtyRate); post-copy sends the
//     rest once, Rest/WireRate. A guest dirtying as fast as the link
//     carries never converges: post-copy at once.
//  3. At round ends, without post-copy: stop when rounds stop shrinking
//     (the downtime is what it is, reported, never hidden); a completion
//     timeout and a round cap end pre-copy the same way.
//
// Without the live figures (WireRate zero: a test's or a caller's round
// history only) the estimate comes from the last round.
func AdaptivePolicy(in PolicyInput) Verdict {
	h := in.History
	rest, pages, rate := in.RemainingBytes, in.RemainingPages, in.WireRate
	if rate <= 0 && len(h) > 0 {
		// From the last round: its wire cost per page and rate.
		last := h[len(h)-1]
		pages = last.DirtyPages
		if last.PagesSent > 0 && last.Duration > 0 && last.WireBytes > 0 {
			rest = int64(float64(last.DirtyPages) * float64(last.WireBytes) / float64(last.PagesSent))
			rate = float64(last.WireBytes) / last.Duration.Seconds()
		}
	}
	notConverging := func(why string) Verdict {
		if in.AllowPostCopy {
			return Verdict{SwitchToPostCopy, why}
		}
		return Verdict{StopAndCopy, why}
	}
	if pages == 0 && !in.Checkpoint {
		return Verdict{StopAndCopy, "converged: nothing dirty"}
	}
	if rate > 0 {
		est := time.Duration(float64(rest) / rate * float64(time.Second))
		// Inside a round, a stop-and-copy waits for the first pass to
		// end: its zero pages and references cost the wire little but
		// the destination a disk read each, which the drain does live and
		// a downtime would wait for.
		if est+in.SwitchCost <= in.MaxDowntime && (!in.Checkpoint || in.UnsentPages == 0) {
			return Verdict{StopAndCopy, fmt.Sprintf("converged: %d pages ≈ %v + %v switch ≤ budget %v",
				pages, est.Round(time.Millisecond), in.SwitchCost.Round(time.Millisecond), in.MaxDowntime)}
		}
		if in.AllowPostCopy && in.WireRate > 0 {
			if in.DirtyRate >= in.WireRate {
				return Verdict{SwitchToPostCopy, fmt.Sprintf("the guest dirties %.0f MB/s, the link carries %.0f MB/s: pre-copy cannot converge", in.DirtyRate/1e6, in.WireRate/1e6)}
			}
			post := float64(rest) / rate
			pre := float64(rest) / (rate - in.DirtyRate)
			gain := time.Duration((pre - post) * float64(time.Second))
			if gain >= postCopyMargin && gain.Seconds() >= postCopyShare*post {
				return Verdict{SwitchToPostCopy, fmt.Sprintf("post-copy finishes %v sooner (%d pages, %.0f MB/s dirtied, %.0f MB/s wire)",
					gain.Round(time.Millisecond), pages, in.DirtyRate/1e6, rate/1e6)}
			}
		}
	}
	if in.Checkpoint {
		if in.CompletionTimeout > 0 && in.Elapsed >= in.CompletionTimeout {
			return notConverging(fmt.Sprintf("completion timeout %v reached", in.CompletionTimeout))
		}
		return Verdict{Continue, "sending"}
	}
	last := h[len(h)-1]
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

// PolicyFor returns the policy of a kind.
func PolicyFor(k PolicyKind) Policy {
	if k == PolicyXen {
		return XenPolicy
	}
	return AdaptivePolicy
}
