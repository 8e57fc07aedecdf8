package main

// Rendering: pure functions from API objects to text, so that the tables,
// the plain progress lines and the bar's text are tested without a cluster.

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/cli-runtime/pkg/printers"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// pageSize is the guest page size the data path moves (x86 Xen).
const pageSize = 4096

// humanBytes prints a byte count in IEC units: 512B, 1.5KiB, 300MiB, 1.2GiB.
func humanBytes(n int64) string {
	const unit = 1024
	if n < 0 {
		return "-" + humanBytes(-n)
	}
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	v := float64(n)
	for i, suffix := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		v /= unit
		if v < unit || i == 4 {
			if v >= 100 {
				return fmt.Sprintf("%.0f%s", v, suffix)
			}
			return fmt.Sprintf("%.1f%s", v, suffix)
		}
	}
	return fmt.Sprintf("%dB", n) // unreachable
}

// humanRate prints bytes per second.
func humanRate(bps int64) string { return humanBytes(bps) + "/s" }

// eta is the time left to send remaining bytes at rate bytes per second;
// false when it cannot be known (no rate yet).
func eta(remaining, rate int64) (time.Duration, bool) {
	if rate <= 0 || remaining < 0 {
		return 0, false
	}
	if remaining == 0 {
		return 0, true
	}
	// Round up to the next 100ms: an ETA of 0 while bytes remain would lie.
	d := time.Duration(float64(remaining) / float64(rate) * float64(time.Second))
	return ((d + 100*time.Millisecond - 1) / (100 * time.Millisecond)) * (100 * time.Millisecond), true
}

// humanDuration prints a duration for people: 350ms, 4.2s, 3m04s, 1h02m.
func humanDuration(d time.Duration) string {
	switch {
	case d < 0:
		return "-" + humanDuration(-d)
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fs", d.Seconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Round(time.Second).Seconds()))
	case d < time.Hour:
		d = d.Round(time.Second)
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	d = d.Round(time.Minute)
	return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
}

// age prints how long ago t was, as kubectl does; "<unknown>" for zero.
func age(t metav1.Time, now time.Time) string {
	if t.IsZero() {
		return "<unknown>"
	}
	return duration.HumanDuration(now.Sub(t.Time))
}

// percent is part of whole in whole percent; 0 when whole is 0.
func percent(part, whole int64) int64 {
	if whole <= 0 {
		return 0
	}
	return part * 100 / whole
}

// condition returns the condition of that type, or nil.
func condition(conds []metav1.Condition, typ string) *metav1.Condition {
	return meta.FindStatusCondition(conds, typ)
}

// conditionStatus is "True", "False", "Unknown" or "-" when absent.
func conditionStatus(conds []metav1.Condition, typ string) string {
	if c := condition(conds, typ); c != nil {
		return string(c.Status)
	}
	return "-"
}

// pastPointOfNoReturn reports whether the domain already runs on the target.
func pastPointOfNoReturn(m *v1.VMMigration) bool {
	return meta.IsStatusConditionTrue(m.Status.Conditions, v1.ResumedOnTargetCondition)
}

// phaseOf is the migration's phase, "Pending" before the controller wrote one.
func phaseOf(m *v1.VMMigration) v1.VMMigrationPhase {
	if m.Status.Phase == "" {
		return v1.MigrationPending
	}
	return m.Status.Phase
}

// dedupSaved is the bytes not sent thanks to disk references: the result's
// figure once there is one, else verified references so far.
func dedupSaved(m *v1.VMMigration) int64 {
	if r := m.Status.Result; r != nil && r.DedupSavedBytes > 0 {
		return r.DedupSavedBytes
	}
	if p := m.Status.Progress; p != nil && p.Pages.Disk > p.Pages.DiskFallback {
		return int64(p.Pages.Disk-p.Pages.DiskFallback) * pageSize
	}
	return 0
}

// waitingReason explains a migration that has not started moving memory:
// the message of its first condition that is not True.
func waitingReason(m *v1.VMMigration) string {
	for _, t := range []string{v1.ValidCondition, v1.ScheduledCondition, v1.TargetReadyCondition} {
		if c := condition(m.Status.Conditions, t); c != nil && c.Status != metav1.ConditionTrue {
			if c.Message != "" {
				return c.Reason + ": " + c.Message
			}
			return c.Reason
		}
	}
	return ""
}

// progressText is one migration's progress in a line, without its name:
// "PreCopy 45% · 300MiB left · 120MiB/s · ETA 2.5s · dedup saved 40MiB · sent 1.2GiB · round 2".
// It is the bar's description and the body of a plain line.
func progressText(m *v1.VMMigration) string {
	phase := phaseOf(m)
	parts := []string{string(phase)}
	p := m.Status.Progress
	if p != nil && !phase.IsFinal() {
		// Most telling first: a bar too narrow for the line drops parts
		// from the end (fit).
		parts[0] = fmt.Sprintf("%s %d%%", phase, p.Percent)
		if pastPointOfNoReturn(m) {
			parts[0] += " (running on " + orText(m.Status.TargetHost, "the target") + ")"
		}
		parts = append(parts, humanBytes(p.RemainingBytes)+" left")
		if p.TransferRate > 0 {
			parts = append(parts, humanRate(p.TransferRate))
		}
		if d, ok := eta(p.RemainingBytes, p.TransferRate); ok {
			parts = append(parts, "ETA "+humanDuration(d))
		} else {
			parts = append(parts, "ETA -")
		}
		if s := dedupSaved(m); s > 0 {
			parts = append(parts, "dedup saved "+humanBytes(s))
		}
		parts = append(parts, "sent "+humanBytes(p.BytesSent))
		if p.Round > 0 && (phase == v1.MigrationPreCopy || phase == v1.MigrationStopAndCopy) {
			parts = append(parts, fmt.Sprintf("round %d", p.Round))
		}
	} else if !phase.IsFinal() {
		if r := waitingReason(m); r != "" {
			parts = append(parts, r)
		}
	}
	return strings.Join(parts, partSep)
}

// resultLine is the last line of a watch: how the migration ended.
func resultLine(m *v1.VMMigration) string {
	name := m.Name
	switch phaseOf(m) {
	case v1.MigrationSucceeded:
		s := fmt.Sprintf("%s Succeeded: domain %s moved %s → %s", name, m.Spec.Domain,
			orDash(m.Status.SourceHost), orDash(m.Status.TargetHost))
		r := m.Status.Result
		if r == nil {
			return s
		}
		s += fmt.Sprintf(" in %s, downtime %s", humanDuration(r.TotalTime.Duration), humanDuration(r.Downtime.Duration))
		if r.MemoryBytes > 0 {
			s += fmt.Sprintf("; sent %s for %s of memory", humanBytes(r.BytesSent), humanBytes(r.MemoryBytes))
		} else {
			s += "; sent " + humanBytes(r.BytesSent)
		}
		if r.DedupSavedBytes > 0 {
			s += ", dedup saved " + humanBytes(r.DedupSavedBytes)
		}
		if r.PostCopy {
			s += fmt.Sprintf(", resumed on target after %s (post-copy)", humanDuration(r.ResumeTime.Duration))
		}
		if r.Verified {
			s += ", every page verified"
		}
		if c := costComparison(m.Status.Predicted, m.Status.Actual); c != "" {
			s += "; " + c
		}
		return s
	case v1.MigrationFailed:
		s := fmt.Sprintf("%s Failed: %s", name, orText(m.Status.FailureReason, "no reason given"))
		if m.Status.DomainHost != "" {
			s += fmt.Sprintf("; domain %s runs on %s", m.Spec.Domain, m.Status.DomainHost)
		}
		return s
	case v1.MigrationCancelled:
		s := fmt.Sprintf("%s Cancelled: %s", name, orText(m.Status.FailureReason, "cancel requested"))
		host := orText(m.Status.DomainHost, m.Status.SourceHost)
		if host != "" {
			s += fmt.Sprintf("; domain %s runs on %s", m.Spec.Domain, host)
		}
		return s
	}
	return fmt.Sprintf("%s %s", name, progressText(m))
}

// costComparison is "predicted 200MiB in 3.0s, actual 210MiB in 3.4s".
func costComparison(pred, act *v1.MigrationCost) string {
	var parts []string
	if pred != nil {
		parts = append(parts, fmt.Sprintf("predicted %s in %s", humanBytes(pred.Bytes), humanDuration(pred.Time.Duration)))
	}
	if act != nil {
		parts = append(parts, fmt.Sprintf("actual %s in %s", humanBytes(act.Bytes), humanDuration(act.Time.Duration)))
	}
	return strings.Join(parts, ", ")
}

// partSep separates the parts of a progress or drain text.
const partSep = " · "

// fit drops the last parts of text until it is at most width runes wide;
// the first part always stays. width <= 0 means no limit.
func fit(text string, width int) string {
	if width <= 0 {
		return text
	}
	parts := strings.Split(text, partSep)
	for len(parts) > 1 && utf8.RuneCountInString(strings.Join(parts, partSep)) > width {
		parts = parts[:len(parts)-1]
	}
	return strings.Join(parts, partSep)
}

func orDash(s string) string { return orText(s, "-") }

func orText(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}

// migrationTable prints VMMigrations as kubectl prints a list.
func migrationTable(w io.Writer, items []v1.VMMigration, allNamespaces bool, now time.Time) error {
	sort.Slice(items, func(i, j int) bool {
		if items[i].Namespace != items[j].Namespace {
			return items[i].Namespace < items[j].Namespace
		}
		return items[i].CreationTimestamp.Before(&items[j].CreationTimestamp) ||
			items[i].CreationTimestamp.Equal(&items[j].CreationTimestamp) && items[i].Name < items[j].Name
	})
	tw := printers.GetNewTabWriter(w)
	head := "NAME\tDOMAIN\tPHASE\tSOURCE\tTARGET\tPROGRESS\tPRIORITY\tREASON\tAGE"
	if allNamespaces {
		head = "NAMESPACE\t" + head
	}
	fmt.Fprintln(tw, head)
	for i := range items {
		m := &items[i]
		progress := "-"
		if p := m.Status.Progress; p != nil {
			progress = fmt.Sprintf("%d%%", p.Percent)
		}
		if phaseOf(m) == v1.MigrationSucceeded {
			progress = "100%"
		}
		row := fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s", m.Name, m.Spec.Domain, phaseOf(m),
			orDash(m.Status.SourceHost), orDash(orText(m.Status.TargetHost, m.Spec.TargetHost)), progress,
			orText(string(m.Spec.Priority), string(v1.PriorityUser)), orDash(m.Status.FailureReason),
			age(m.CreationTimestamp, now))
		if allNamespaces {
			row = m.Namespace + "\t" + row
		}
		fmt.Fprintln(tw, row)
	}
	return tw.Flush()
}

// describeMigration prints one migration in full (status without --watch).
func describeMigration(w io.Writer, m *v1.VMMigration, now time.Time) error {
	tw := printers.GetNewTabWriter(w)
	fmt.Fprintf(tw, "Name:\t%s/%s\n", m.Namespace, m.Name)
	fmt.Fprintf(tw, "Domain:\t%s\n", m.Spec.Domain)
	fmt.Fprintf(tw, "Hosts:\t%s → %s\n", orDash(m.Status.SourceHost), orDash(orText(m.Status.TargetHost, m.Spec.TargetHost)))
	strategy := orText(string(m.Spec.Strategy), string(v1.StrategyHybrid))
	if p := m.Status.Parameters; p != nil && p.EngineStrategy != "" {
		strategy += " (" + p.EngineStrategy + ")"
	}
	fmt.Fprintf(tw, "Strategy:\t%s\n", strategy)
	fmt.Fprintf(tw, "Priority:\t%s\n", orText(string(m.Spec.Priority), string(v1.PriorityUser)))
	if r := m.Labels[v1.ReasonLabel]; r != "" {
		fmt.Fprintf(tw, "Started by:\t%s\n", r)
	}
	fmt.Fprintf(tw, "Phase:\t%s\n", phaseOf(m))
	if m.Spec.Cancel {
		fmt.Fprintf(tw, "Cancel:\trequested\n")
	}
	if !phaseOf(m).IsFinal() {
		fmt.Fprintf(tw, "Progress:\t%s\n", progressText(m))
	} else {
		fmt.Fprintf(tw, "Result:\t%s\n", resultLine(m))
	}
	if c := costComparison(m.Status.Predicted, m.Status.Actual); c != "" {
		fmt.Fprintf(tw, "Cost:\t%s\n", c)
	}
	fmt.Fprintf(tw, "Age:\t%s\n", age(m.CreationTimestamp, now))
	if len(m.Status.Conditions) > 0 {
		fmt.Fprintf(tw, "Conditions:\n")
		fmt.Fprintf(tw, "  TYPE\tSTATUS\tREASON\tMESSAGE\n")
		for _, c := range m.Status.Conditions {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", c.Type, c.Status, c.Reason, c.Message)
		}
	}
	return tw.Flush()
}

// hostTable prints XenHosts with capacity and load.
func hostTable(w io.Writer, hosts []v1.XenHost, now time.Time) error {
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Name < hosts[j].Name })
	tw := printers.GetNewTabWriter(w)
	fmt.Fprintln(tw, "NAME\tBACKEND\tREADY\tCORDONED\tDRAINING\tDOMAINS\tMEMORY USED/CAPACITY\tCPU LOAD\tFREE\tAGE")
	for i := range hosts {
		h := &hosts[i]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%s\t%d\t%s\t%s\t%s\t%s\n", h.Name, orDash(h.Status.Backend),
			conditionStatus(h.Status.Conditions, v1.HostAgentReadyCondition), h.Spec.Unschedulable,
			drainingText(h), h.Status.Domains, memoryText(h), cpuText(h), freeText(h),
			age(h.CreationTimestamp, now))
	}
	return tw.Flush()
}

// drainingText is the Draining condition, or "Requested" while spec.drain
// is set and the controller has not answered yet.
func drainingText(h *v1.XenHost) string {
	s := conditionStatus(h.Status.Conditions, v1.HostDrainingCondition)
	if s == "-" && h.Spec.Drain {
		return "Requested"
	}
	if s == "-" {
		return "False"
	}
	return s
}

func memoryText(h *v1.XenHost) string {
	c := h.Status.CapacityBytes
	if c <= 0 {
		return "-"
	}
	used := c - h.Status.FreeBytes
	return fmt.Sprintf("%s/%s (%d%%)", humanBytes(used), humanBytes(c), percent(used, c))
}

func cpuText(h *v1.XenHost) string {
	if h.Status.Load == nil || h.Status.CPUs <= 0 {
		return "-"
	}
	capm := int64(h.Status.CPUs) * 1000
	return fmt.Sprintf("%dm/%dm (%d%%)", h.Status.Load.CPUMillis, capm, percent(h.Status.Load.CPUMillis, capm))
}

func freeText(h *v1.XenHost) string {
	if h.Status.CapacityBytes <= 0 {
		return "-"
	}
	return humanBytes(h.Status.FreeBytes)
}

// drainText is one line of a host's evacuation, without a timestamp:
// "3 left · 2 migrating · 5 migrated · 0 failed · Draining=True Evacuated=False · blocked: ns/x (reason)".
func drainText(h *v1.XenHost) string {
	conds := fmt.Sprintf("Draining=%s Evacuated=%s",
		conditionStatus(h.Status.Conditions, v1.HostDrainingCondition),
		conditionStatus(h.Status.Conditions, v1.HostEvacuatedCondition))
	d := h.Status.Drain
	if d == nil {
		if h.Spec.Drain {
			return "drain requested, waiting for the controller" + partSep + conds
		}
		return conds
	}
	parts := []string{
		fmt.Sprintf("%d left", d.Domains),
		fmt.Sprintf("%d migrating", d.Migrating),
		fmt.Sprintf("%d migrated", d.Migrated),
		fmt.Sprintf("%d failed", d.Failed),
		conds,
	}
	if len(d.Blocked) > 0 {
		parts = append(parts, "blocked: "+domainList(d.Blocked))
	}
	if len(d.LeftBehind) > 0 {
		parts = append(parts, "left behind: "+domainList(d.LeftBehind))
	}
	return strings.Join(parts, partSep)
}

// domainList is "ns/a (reason), ns/b (reason)".
func domainList(ds []v1.BlockedDomain) string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = fmt.Sprintf("%s/%s (%s)", d.Namespace, d.Name, d.Reason)
	}
	return strings.Join(s, ", ")
}

// evacuated reports whether the controller says the host is empty of the
// domains that must move, for the host's current spec.
func evacuated(h *v1.XenHost) bool {
	c := condition(h.Status.Conditions, v1.HostEvacuatedCondition)
	return c != nil && c.Status == metav1.ConditionTrue &&
		(c.ObservedGeneration == 0 || c.ObservedGeneration >= h.Generation)
}

// drainProgress is (migrated, total) for the drain bar.
func drainProgress(h *v1.XenHost) (int64, int64) {
	d := h.Status.Drain
	if d == nil {
		return 0, 1
	}
	done := int64(d.Migrated)
	total := done + int64(d.Domains)
	if total < 1 {
		total = 1
	}
	return done, total
}

// drainSummary is the last line of drain --watch.
func drainSummary(h *v1.XenHost) string {
	s := fmt.Sprintf("host %s evacuated", h.Name)
	d := h.Status.Drain
	if d == nil {
		return s
	}
	if d.StartTime != nil && d.CompletionTime != nil {
		s += " in " + humanDuration(d.CompletionTime.Sub(d.StartTime.Time))
	}
	s += fmt.Sprintf(": %d migrated, %d failed attempts", d.Migrated, d.Failed)
	if len(d.LeftBehind) > 0 {
		s += "; left to shut down with the host: " + domainList(d.LeftBehind)
	}
	return s
}

// planReport prints a RebalancePolicy's view and plan.
func planReport(w io.Writer, p *v1.RebalancePolicy, now time.Time) error {
	st := &p.Status
	mode := orText(string(p.Spec.Mode), string(v1.RebalancePerformance))
	if p.Spec.DryRun {
		mode += ", dry run"
	}
	state := "inactive"
	if st.Active {
		state = "active"
	}
	fmt.Fprintf(w, "RebalancePolicy %s (%s): %s, imbalance %d%% (trigger %d%%, target %d%%)\n", p.Name, mode, state,
		st.ImbalancePercent, int32Or(p.Spec.TriggerImbalancePercent, 20), int32Or(p.Spec.TargetImbalancePercent, 10))
	last := "never"
	if st.LastCycleTime != nil {
		last = age(*st.LastCycleTime, now) + " ago"
	}
	fmt.Fprintf(w, "Cycles: %d, last %s; migrations started: %d (%d in the last hour)\n",
		st.Cycles, last, st.MigrationsStarted, st.MigrationsLastHour)

	fmt.Fprintln(w)
	tw := printers.GetNewTabWriter(w)
	fmt.Fprintln(tw, "HOST\tLOAD\tCPU\tMEMORY\tDOMAINS")
	hosts := append([]v1.HostLoadStatus(nil), st.Hosts...)
	sort.Slice(hosts, func(i, j int) bool {
		if hosts[i].LoadPercent != hosts[j].LoadPercent {
			return hosts[i].LoadPercent > hosts[j].LoadPercent
		}
		return hosts[i].Host < hosts[j].Host
	})
	for _, h := range hosts {
		fmt.Fprintf(tw, "%s\t%d%%\t%d%%\t%d%%\t%d\n", h.Host, h.LoadPercent, h.CPUPercent, h.MemoryPercent, h.Domains)
	}
	if len(hosts) == 0 {
		fmt.Fprintln(tw, "(no hosts measured yet)\t\t\t\t")
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w)
	if len(st.Plan) == 0 {
		fmt.Fprintln(w, "Plan: no moves")
	} else {
		fmt.Fprintln(w, "Plan (best move first):")
		tw = printers.GetNewTabWriter(w)
		fmt.Fprintln(tw, "#\tDOMAIN\tMOVE\tIMBALANCE AFTER\tPREDICTED\tMIGRATION")
		for i, m := range st.Plan {
			pred := "-"
			if m.PredictedBytes > 0 || m.PredictedTime.Duration > 0 {
				pred = fmt.Sprintf("%s in %s", humanBytes(m.PredictedBytes), humanDuration(m.PredictedTime.Duration))
			}
			fmt.Fprintf(tw, "%d\t%s/%s\t%s → %s\t%d%%\t%s\t%s\n", i+1, m.Namespace, m.Domain, m.From, m.To,
				m.ImbalanceAfterPercent, pred, orDash(m.Migration))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(st.EmptiableHosts) > 0 {
		fmt.Fprintf(w, "Emptiable hosts: %s\n", strings.Join(st.EmptiableHosts, ", "))
	}
	if st.Message != "" {
		fmt.Fprintf(w, "Message: %s\n", st.Message)
	}
	return nil
}

func int32Or(p *int32, def int32) int32 {
	if p == nil {
		return def
	}
	return *p
}
