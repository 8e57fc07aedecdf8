package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

const (
	kib = int64(1024)
	mib = 1024 * kib
	gib = 1024 * mib
)

func TestETA(t *testing.T) {
	for _, tc := range []struct {
		name            string
		remaining, rate int64
		want            time.Duration
		ok              bool
	}{
		{"no rate yet: unknown", 100 * mib, 0, 0, false},
		{"negative rate: unknown", 100 * mib, -1, 0, false},
		{"nothing left: zero", 0, 100 * mib, 0, true},
		{"exact seconds", 300 * mib, 100 * mib, 3 * time.Second, true},
		{"a fraction rounds up to the next 100ms", 250 * mib, 100 * mib, 2500 * time.Millisecond, true},
		{"a few bytes left is never an ETA of zero", 1, 100 * mib, 100 * time.Millisecond, true},
		{"2.01s rounds up to 2.1s", 201 * mib, 100 * mib, 2100 * time.Millisecond, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := eta(tc.remaining, tc.rate)
			if got != tc.want || ok != tc.ok {
				t.Fatalf("eta(%d, %d) = %v, %t; want %v, %t", tc.remaining, tc.rate, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestHumanUnits(t *testing.T) {
	for in, want := range map[int64]string{
		0: "0B", 512: "512B", 1536: "1.5KiB", 300 * mib: "300MiB", 1288490189: "1.2GiB",
		100 * gib: "100GiB", -2 * mib: "-2.0MiB",
	} {
		if got := humanBytes(in); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[time.Duration]string{
		350 * time.Millisecond: "350ms", 4200 * time.Millisecond: "4.2s", 42 * time.Second: "42s",
		184 * time.Second: "3m04s", 62 * time.Minute: "1h02m",
	} {
		if got := humanDuration(in); got != want {
			t.Errorf("humanDuration(%v) = %q, want %q", in, got, want)
		}
	}
}

// running is a migration in pre-copy with the figures the tests check.
func running() *v1.VMMigration {
	m := &v1.VMMigration{
		ObjectMeta: metav1.ObjectMeta{Name: "web-x7k2p", Namespace: "demo"},
		Spec:       v1.VMMigrationSpec{Domain: "web"},
		Status: v1.VMMigrationStatus{
			Phase: v1.MigrationPreCopy, SourceHost: "host-a", TargetHost: "host-b",
			Progress: &v1.MigrationProgress{
				Round: 2, Percent: 45, BytesSent: 600 * mib, RemainingBytes: 250 * mib, TransferRate: 100 * mib,
				Pages: v1.PageClasses{Disk: 10240, DiskFallback: 240},
			},
		},
	}
	return m
}

func TestProgressText(t *testing.T) {
	m := running()
	got := progressText(m)
	// 250MiB at 100MiB/s is 2.5s; (10240-240) verified disk pages of 4KiB saved 39MiB.
	want := "PreCopy 45% · 250MiB left · 100MiB/s · ETA 2.5s · dedup saved 39.1MiB · sent 600MiB · round 2"
	if got != want {
		t.Fatalf("progressText:\n got %q\nwant %q", got, want)
	}

	m.Status.Progress.TransferRate = 0
	if got := progressText(m); !strings.Contains(got, "ETA -") || strings.Contains(got, "/s") {
		t.Errorf("without a rate the ETA is unknown and no rate is shown: %q", got)
	}

	m.Status.Phase = v1.MigrationPostCopy
	m.Status.Progress.TransferRate = 100 * mib
	meta.SetStatusCondition(&m.Status.Conditions, metav1.Condition{Type: v1.ResumedOnTargetCondition, Status: metav1.ConditionTrue, Reason: v1.ReasonResumed})
	if got := progressText(m); !strings.HasPrefix(got, "PostCopy 45% (running on host-b) · 250MiB left") || strings.Contains(got, "round") {
		t.Errorf("post-copy: %q", got)
	}

	waiting := &v1.VMMigration{Status: v1.VMMigrationStatus{Phase: v1.MigrationScheduling}}
	meta.SetStatusCondition(&waiting.Status.Conditions, metav1.Condition{Type: v1.ValidCondition, Status: metav1.ConditionTrue, Reason: v1.ReasonValidated})
	meta.SetStatusCondition(&waiting.Status.Conditions, metav1.Condition{Type: v1.ScheduledCondition, Status: metav1.ConditionFalse,
		Reason: v1.ReasonWaitingForSlot, Message: "2 migrations hold the host's slots"})
	if got, want := progressText(waiting), "Scheduling · WaitingForSlot: 2 migrations hold the host's slots"; got != want {
		t.Errorf("waiting: got %q, want %q", got, want)
	}
}

func TestResultLine(t *testing.T) {
	m := running()
	m.Status.Phase = v1.MigrationSucceeded
	m.Status.Result = &v1.MigrationResult{
		TotalTime: metav1.Duration{Duration: 4200 * time.Millisecond}, Downtime: metav1.Duration{Duration: 35 * time.Millisecond},
		ResumeTime: metav1.Duration{Duration: 1100 * time.Millisecond}, BytesSent: 210 * mib, MemoryBytes: gib,
		DedupSavedBytes: 400 * mib, PostCopy: true, Verified: true,
	}
	m.Status.Predicted = &v1.MigrationCost{Bytes: 200 * mib, Time: metav1.Duration{Duration: 4 * time.Second}}
	m.Status.Actual = &v1.MigrationCost{Bytes: 210 * mib, Time: metav1.Duration{Duration: 4200 * time.Millisecond}}
	want := "web-x7k2p Succeeded: domain web moved host-a → host-b in 4.2s, downtime 35ms; sent 210MiB for 1.0GiB of memory, " +
		"dedup saved 400MiB, resumed on target after 1.1s (post-copy), every page verified; predicted 200MiB in 4.0s, actual 210MiB in 4.2s"
	if got := resultLine(m); got != want {
		t.Fatalf("resultLine:\n got %q\nwant %q", got, want)
	}

	m.Status.Phase, m.Status.FailureReason, m.Status.DomainHost = v1.MigrationFailed, "SourceFailed: connection reset", "host-a"
	if got, want := resultLine(m), "web-x7k2p Failed: SourceFailed: connection reset; domain web runs on host-a"; got != want {
		t.Errorf("failed: got %q, want %q", got, want)
	}
	m.Status.Phase, m.Status.FailureReason, m.Status.DomainHost = v1.MigrationCancelled, "", ""
	if got, want := resultLine(m), "web-x7k2p Cancelled: cancel requested; domain web runs on host-a"; got != want {
		t.Errorf("cancelled: got %q, want %q", got, want)
	}
}

// TestLineView: one line per change; an unchanged status prints nothing.
func TestLineView(t *testing.T) {
	var out bytes.Buffer
	clock := time.Date(2026, 12, 6, 3, 4, 5, 0, time.UTC)
	o := &options{now: func() time.Time { return clock }, terminal: func(io.Writer) bool { return false }}
	o.streams.Out = &out
	v := o.newMigrationView("web-x7k2p")
	m := running()
	v.show(m)
	v.show(m.DeepCopy()) // same again: no line
	m.Status.Progress.Percent, m.Status.Progress.RemainingBytes = 90, 50*mib
	v.show(m)
	m.Status.Phase = v1.MigrationSucceeded
	v.end(m)
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 lines (two changes and the result), got %d:\n%s", len(lines), out.String())
	}
	for i, want := range []string{
		"03:04:05 web-x7k2p PreCopy 45% ·", "03:04:05 web-x7k2p PreCopy 90% · 50.0MiB left · 100MiB/s · ETA 500ms · dedup saved 39.1MiB · sent 600MiB · round 2",
		"03:04:05 web-x7k2p Succeeded: domain web moved host-a → host-b",
	} {
		if !strings.HasPrefix(lines[i], want) {
			t.Errorf("line %d: %q does not start with %q", i, lines[i], want)
		}
	}
}

var ansi = regexp.MustCompile("\x1b\\[[0-9;]*[A-Za-z]")

// TestBarView: on a terminal, a bar of the percent with the progress text
// after it, full only when the migration succeeded, then the result line.
func TestBarView(t *testing.T) {
	var out bytes.Buffer
	o := &options{now: time.Now, terminal: func(io.Writer) bool { return true }, width: func(io.Writer) int { return 120 }}
	o.streams.Out = &out
	v := o.newMigrationView("web-x7k2p").(*barView)
	m := running()
	v.show(m)
	bar := ansi.ReplaceAllString(v.bar.String(), "")
	// 120 columns leave room for a 30-column bar and the text up to the
	// dedup savings.
	text := "PreCopy 45% · 250MiB left · 100MiB/s · ETA 2.5s · dedup saved 39.1MiB"
	if !strings.Contains(bar, " 45% ") || !strings.Contains(bar, "█") || !strings.HasSuffix(strings.TrimSpace(bar), text) {
		t.Fatalf("bar %q lacks the percent, the bar or ends otherwise than %q", bar, text)
	}
	if w := utf8.RuneCountInString(strings.TrimRight(bar, " \r")); w > 120 || barOf(bar) != 30 {
		t.Errorf("the bar's line is %d columns wide (terminal: 120), or its bar is not 30 wide: %q", w, bar)
	}
	// 80 columns: a narrower bar, and the text still reaches the ETA.
	narrow := &barView{w: io.Discard, width: 80}
	narrow.show(m)
	bar80 := ansi.ReplaceAllString(narrow.bar.String(), "")
	if w := utf8.RuneCountInString(strings.TrimRight(bar80, " \r")); w > 80 || barOf(bar80) != 10 || !strings.HasSuffix(strings.TrimSpace(bar80), "ETA 2.5s") {
		t.Errorf("on 80 columns the line is %d wide, or does not end with the ETA: %q", w, bar80)
	}
	m.Status.Progress.Percent = 100 // the source says all sent, the migration goes on
	v.show(m)
	if bar := ansi.ReplaceAllString(v.bar.String(), ""); !strings.Contains(bar, " 99% ") {
		t.Errorf("the bar is full only once the migration succeeded: %q", bar)
	}
	m.Status.Phase = v1.MigrationSucceeded
	v.end(m)
	text = ansi.ReplaceAllString(out.String(), "")
	if !strings.HasPrefix(text, "web-x7k2p: domain web from host-a to host-b\n") {
		t.Errorf("no header line: %q", text)
	}
	if !strings.Contains(text, "100% ") || !strings.HasSuffix(text, resultLine(m)+"\n") {
		t.Errorf("the end is not a full bar then the result line: %q", text)
	}
}

// barOf is the width of the bar between its | ends.
func barOf(line string) int {
	parts := strings.Split(line, "|")
	if len(parts) < 3 {
		return -1
	}
	return utf8.RuneCountInString(parts[1])
}

func TestFit(t *testing.T) {
	text := "PreCopy 45% · 250MiB left · 100MiB/s"
	for width, want := range map[int]string{
		0: text, 100: text, len([]rune(text)): text, len([]rune(text)) - 1: "PreCopy 45% · 250MiB left",
		12: "PreCopy 45%", 3: "PreCopy 45%",
	} {
		if got := fit(text, width); got != want {
			t.Errorf("fit(%d) = %q, want %q", width, got, want)
		}
	}
}

func TestMigrationTable(t *testing.T) {
	now := time.Date(2026, 12, 6, 3, 0, 0, 0, time.UTC)
	a := running()
	a.CreationTimestamp = metav1.NewTime(now.Add(-90 * time.Second))
	b := &v1.VMMigration{
		ObjectMeta: metav1.ObjectMeta{Name: "db-1", Namespace: "prod", CreationTimestamp: metav1.NewTime(now.Add(-time.Hour))},
		Spec:       v1.VMMigrationSpec{Domain: "db", Priority: v1.PriorityEvacuation},
		Status:     v1.VMMigrationStatus{Phase: v1.MigrationFailed, SourceHost: "host-c", FailureReason: "SourceAgentLost"},
	}
	var out bytes.Buffer
	if err := migrationTable(&out, []v1.VMMigration{*b, *a}, true, now); err != nil {
		t.Fatal(err)
	}
	rows := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(rows) != 3 {
		t.Fatalf("want a header and 2 rows:\n%s", out.String())
	}
	fields := func(s string) string { return strings.Join(strings.Fields(s), " ") }
	if got, want := fields(rows[0]), "NAMESPACE NAME DOMAIN PHASE SOURCE TARGET PROGRESS PRIORITY REASON AGE"; got != want {
		t.Errorf("header %q, want %q", got, want)
	}
	if got, want := fields(rows[1]), "demo web-x7k2p web PreCopy host-a host-b 45% User - 90s"; got != want {
		t.Errorf("row 1 %q, want %q", got, want)
	}
	if got, want := fields(rows[2]), "prod db-1 db Failed host-c - - Evacuation SourceAgentLost 60m"; got != want {
		t.Errorf("row 2 %q, want %q", got, want)
	}
}

func TestHostTable(t *testing.T) {
	h := v1.XenHost{
		ObjectMeta: metav1.ObjectMeta{Name: "host-a"},
		Spec:       v1.XenHostSpec{Drain: true},
		Status: v1.XenHostStatus{
			Backend: "sim", CPUs: 4, CapacityBytes: 8 * gib, FreeBytes: 5 * gib, Domains: 3,
			Load: &v1.HostLoad{CPUMillis: 1200},
		},
	}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostAgentReadyCondition, Status: metav1.ConditionTrue, Reason: "Heartbeat"})
	var out bytes.Buffer
	if err := hostTable(&out, []v1.XenHost{h}, time.Now()); err != nil {
		t.Fatal(err)
	}
	rows := strings.Split(strings.TrimSpace(out.String()), "\n")
	// 3 GiB used of 8 (37%); 1200m of 4 CPUs (30%); Draining not answered yet: Requested.
	want := "host-a sim True false Requested 3 3.0GiB/8.0GiB (37%) 1200m/4000m (30%) 5.0GiB"
	if got := strings.Join(strings.Fields(rows[1]), " "); !strings.HasPrefix(got, want) {
		t.Errorf("row %q, want it to start with %q", got, want)
	}
}

func TestDrainText(t *testing.T) {
	h := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-a", Generation: 2}, Spec: v1.XenHostSpec{Drain: true}}
	if got, want := drainText(h), "drain requested, waiting for the controller · Draining=- Evacuated=-"; got != want {
		t.Errorf("before the controller: %q, want %q", got, want)
	}
	h.Status.Drain = &v1.DrainStatus{Reason: v1.DrainReasonRequested, Domains: 3, Migrating: 2, Migrated: 5, Failed: 1,
		Blocked: []v1.BlockedDomain{{Namespace: "demo", Name: "db", Reason: "no host has 16GiB free"}}}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostDrainingCondition, Status: metav1.ConditionTrue, Reason: "DrainRequested"})
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostEvacuatedCondition, Status: metav1.ConditionFalse, Reason: "DomainsLeft"})
	want := "3 left · 2 migrating · 5 migrated · 1 failed · Draining=True Evacuated=False · blocked: demo/db (no host has 16GiB free)"
	if got := drainText(h); got != want {
		t.Errorf("draining:\n got %q\nwant %q", got, want)
	}
	if done, total := drainProgress(h); done != 5 || total != 8 {
		t.Errorf("drainProgress = %d/%d, want 5/8", done, total)
	}
	if evacuated(h) {
		t.Error("evacuated with Evacuated=False")
	}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostEvacuatedCondition, Status: metav1.ConditionTrue, Reason: "Empty", ObservedGeneration: 1})
	if evacuated(h) {
		t.Error("an Evacuated condition of an older generation counts")
	}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostEvacuatedCondition, Status: metav1.ConditionTrue, Reason: "Empty", ObservedGeneration: 2})
	if !evacuated(h) {
		t.Error("not evacuated with Evacuated=True for this generation")
	}
}

func TestPlanReport(t *testing.T) {
	now := time.Date(2026, 12, 6, 3, 0, 0, 0, time.UTC)
	trigger := int32(25)
	p := &v1.RebalancePolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "spread"},
		Spec:       v1.RebalancePolicySpec{Mode: v1.RebalanceDensity, DryRun: true, TriggerImbalancePercent: &trigger},
		Status: v1.RebalancePolicyStatus{
			Active: true, ImbalancePercent: 31, Cycles: 14, LastCycleTime: &metav1.Time{Time: now.Add(-12 * time.Second)},
			MigrationsStarted: 3, MigrationsLastHour: 1,
			Hosts: []v1.HostLoadStatus{{Host: "b", LoadPercent: 20, CPUPercent: 10, MemoryPercent: 30, Domains: 1},
				{Host: "a", LoadPercent: 51, CPUPercent: 62, MemoryPercent: 40, Domains: 5}},
			Plan: []v1.PlannedMove{{Namespace: "demo", Domain: "web", From: "a", To: "b", ImbalanceAfterPercent: 12,
				PredictedBytes: 120 * mib, PredictedTime: metav1.Duration{Duration: 3200 * time.Millisecond}}},
			EmptiableHosts: []string{"b"}, Message: "1 move lowers imbalance from 31% to 12%",
		},
	}
	var out bytes.Buffer
	if err := planReport(&out, p, now); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, want := range []string{
		"RebalancePolicy spread (Density, dry run): active, imbalance 31% (trigger 25%, target 10%)\n",
		"Cycles: 14, last 12s ago; migrations started: 3 (1 in the last hour)\n",
		"Emptiable hosts: b\n", "Message: 1 move lowers imbalance from 31% to 12%\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
	lines := strings.Split(text, "\n")
	var hostRows, moveRow []string
	for i, l := range lines {
		if strings.HasPrefix(l, "HOST") {
			hostRows = lines[i+1 : i+3]
		}
		if strings.HasPrefix(l, "#") {
			moveRow = strings.Fields(lines[i+1])
		}
	}
	if len(hostRows) != 2 || !strings.HasPrefix(hostRows[0], "a ") {
		t.Errorf("hosts are not listed most loaded first: %q", hostRows)
	}
	if got, want := strings.Join(moveRow, " "), "1 demo/web a → b 12% 120MiB in 3.2s -"; got != want {
		t.Errorf("move row %q, want %q", got, want)
	}
}

func TestExitCode(t *testing.T) {
	var stderr bytes.Buffer
	for _, tc := range []struct {
		err  error
		want int
		msg  bool
	}{
		{nil, 0, false},
		{fmt.Errorf("watch: %w", errInterrupted), exitInterrupted, false},
		{&outcomeError{msg: "migration x Failed"}, exitOutcome, false},
		{errors.New("boom"), exitFailed, true},
	} {
		stderr.Reset()
		if got := exitCode(tc.err, &stderr); got != tc.want || (stderr.Len() > 0) != tc.msg {
			t.Errorf("exitCode(%v) = %d, printed %q; want %d, message %t", tc.err, got, stderr.String(), tc.want, tc.msg)
		}
	}
}

// TestDrainBar: on a terminal, a bar of migrated of all, each blocked domain
// on a line of its own once, and the summary at the end.
func TestDrainBar(t *testing.T) {
	var out bytes.Buffer
	o := &options{now: time.Now, terminal: func(io.Writer) bool { return true }, width: func(io.Writer) int { return 100 }}
	v := &drainView{o: o, w: &out}
	h := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-a"}, Spec: v1.XenHostSpec{Drain: true}}
	h.Status.Drain = &v1.DrainStatus{Domains: 3, Migrating: 2, Migrated: 1,
		Blocked: []v1.BlockedDomain{{Namespace: "demo", Name: "db", Reason: "no host has room"}}}
	v.show(h)
	bar := ansi.ReplaceAllString(v.bar.String(), "")
	if !strings.Contains(bar, " 25% ") || !strings.Contains(bar, "3 left · 2 migrating · 1 migrated") || strings.Contains(bar, "blocked") {
		t.Errorf("drain bar %q: want 1 of 4 (25%%), the counts, and no blocked list", bar)
	}
	h.Status.Drain.Migrating = 1 // blocked unchanged: not printed again
	v.show(h)
	h.Status.Drain = &v1.DrainStatus{Migrated: 4}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostEvacuatedCondition, Status: metav1.ConditionTrue, Reason: "Empty"})
	v.show(h)
	if bar := ansi.ReplaceAllString(v.bar.String(), ""); strings.Contains(bar, "100%") {
		t.Errorf("the drain bar is full before the end: %q", bar)
	}
	v.end(drainSummary(h), true)
	text := ansi.ReplaceAllString(out.String(), "")
	if n := strings.Count(text, "blocked: demo/db: no host has room\n"); n != 1 {
		t.Errorf("the blocked domain was printed %d times, want once:\n%q", n, text)
	}
	if !strings.Contains(text, "100% ") || !strings.HasSuffix(text, "\nhost host-a evacuated: 4 migrated, 0 failed attempts\n") {
		t.Errorf("the end is not a full bar then the summary:\n%q", text)
	}
}
