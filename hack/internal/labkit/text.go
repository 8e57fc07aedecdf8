package labkit

import (
	"strings"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// PhaseOf is a migration's phase for a report: "Pending" before the
// controller set one, "?" for no migration at all.
func PhaseOf(m *v1.VMMigration) string {
	if m == nil {
		return "?"
	}
	if m.Status.Phase == "" {
		return "Pending"
	}
	return string(m.Status.Phase)
}

// Clip puts s on one line and cuts it to n bytes (plus an ellipsis), for
// messages quoted in a one-line JSON result.
func Clip(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Round1 rounds a non-negative f to one decimal (seconds in results).
func Round1(f float64) float64 { return float64(int64(f*10+0.5)) / 10 }
