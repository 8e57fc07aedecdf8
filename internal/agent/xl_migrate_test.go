package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/internal/testlog"
	"github.com/xenferry/xenferry/pkg/xenmem/xen"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

// startXLAgent runs an agent on the Xen backend over the stand-in xl: the
// real xen backend parses its info and list output, and migrations run
// the agent's xl path (xl migrate with node-agent xl-send, the agent's xl
// receiver running xl migrate-receive).
func startXLAgent(t *testing.T, name, ns string, h fakeXLHost) {
	t.Helper()
	host, err := xen.Open(context.Background(), xen.Options{XL: h.xl, Capabilities: "-", HostName: name, Log: testlog.New(t)})
	if err != nil {
		t.Fatalf("xen backend over the stand-in xl: %v", err)
	}
	a, err := New(as(agentUser), host, Config{
		Host: name, DataAddr: "127.0.0.1:0", Namespace: ns,
		HeartbeatInterval: 300 * time.Millisecond, StatusInterval: 200 * time.Millisecond,
		StateDir: t.TempDir(), XL: h.xl, NodeAgent: h.agent, Log: testlog.New(t).WithName("agent-" + name),
	})
	if err != nil {
		t.Fatalf("agent %s: %v", name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	t.Cleanup(func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Logf("agent %s stopped: %v", name, err)
			}
		})
		deleteHost(t, name)
	})
}

// newXLDomain puts the captured stream's domain on a stand-in host.
func newXLDomain(t *testing.T, h fakeXLHost) string {
	t.Helper()
	t.Setenv("FAKE_XL_STREAM", h.stream)
	raw, err := fakeStream()
	if err != nil {
		t.Fatal(err)
	}
	rd := xlstream.NewReader(strings.NewReader(string(raw[:1<<20])))
	for rd.XL() == nil {
		if _, err := rd.Next(); err != nil {
			t.Fatalf("the captured stream has no xl header: %v", err)
		}
	}
	name := fakeConfigName(rd.XL().Config)
	t.Setenv("FAKE_XL_DIR", h.dir)
	fakeSetConfig(name, rd.XL().Config)
	fakeSetDomain(name, "running")
	return name
}

// A VMMigration between two hosts whose backend is Xen's toolstack moves
// the domain through the agents' xl path: the controller resolves the
// default strategy to PreCopy with dedup, the source agent runs xl migrate
// with its transport and reports live progress, the target agent admits
// only the authorised source and reports from what runs there. Failures on
// either side of the permission to go end with the domain on one host.
func TestXLMigrationThroughTheOperator(t *testing.T) {
	requireEnv(t)
	info, err := filepath.Abs("../../pkg/xenmem/xen/testdata/lab-a-empty/info.txt")
	if err != nil {
		t.Fatal(err)
	}
	startController(t, ctrlOpts{})
	for _, c := range []struct {
		name       string
		recvEnv    []string
		phase      v1.VMMigrationPhase
		onA, onB   string // the domain's state on each host at the end ("" absent)
		targetSays func(*v1.TargetState) bool
	}{
		{name: "success", phase: v1.MigrationSucceeded, onA: "", onB: "running",
			targetSays: func(s *v1.TargetState) bool { return s.Resumed && s.Completed }},
		{name: "target fails before ready", recvEnv: []string{"FAKE_XL_FAIL=before-ready"}, phase: v1.MigrationFailed, onA: "running", onB: "",
			targetSays: func(s *v1.TargetState) bool { return s.Failed && s.Discarded }},
		{name: "report lost after go", recvEnv: []string{"FAKE_XL_FAIL=no-report"}, phase: v1.MigrationSucceeded, onA: "", onB: "running",
			targetSays: func(s *v1.TargetState) bool { return s.Resumed && s.Completed }},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns := newNamespace(t)
			a, b := ns+"-xa", ns+"-xb"
			ha := newFakeXLHost(t, "FAKE_XL_INFO="+info)
			hb := newFakeXLHost(t, append([]string{"FAKE_XL_INFO=" + info}, c.recvEnv...)...)
			dom := newXLDomain(t, ha)
			startXLAgent(t, a, ns, ha)
			startXLAgent(t, b, ns, hb)
			waitDomainOn(t, ns, dom, a, 20*time.Second)
			waitFor(t, "XenHost "+b, 20*time.Second, func() (bool, string) {
				h := &v1.XenHost{}
				err := k8s.Get(context.Background(), types.NamespacedName{Name: b}, h)
				return err == nil && h.Status.Capabilities != nil, fmt.Sprint(err)
			})

			before := &v1.XenDomain{}
			if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: dom}, before); err != nil {
				t.Fatal(err)
			}
			create(t, migration(ns, "move", dom, b))
			m := waitPhase(t, ns, "move", 60*time.Second, v1.MigrationSucceeded, v1.MigrationFailed)
			t.Logf("%s: %s", c.name, describe(m))
			if m.Status.Phase != c.phase {
				t.Fatalf("phase %s, want %s: %s", m.Status.Phase, c.phase, describe(m))
			}
			if p := m.Status.Parameters; p == nil || p.EngineStrategy != "precopy+dedup" || p.Compression != v1.PageCodecZstd {
				t.Fatalf("parameters %+v, want precopy+dedup with zstd between xl hosts (xl-send runs with --compress)", p)
			}
			if cond := condition(m, v1.ValidCondition); cond == nil || cond.Status != metav1.ConditionTrue || !strings.Contains(cond.Message, "PreCopy") {
				t.Errorf("Valid condition %+v: want True, saying the strategy runs as PreCopy", cond)
			}
			// The target's verdict may follow the source's report.
			waitFor(t, "the target's verdict", 20*time.Second, func() (bool, string) {
				ts := getMig(t, ns, "move").Status.Target
				return ts != nil && c.targetSays(ts), fmt.Sprintf("%+v", ts)
			})
			if got := fakeStateOf(t, ha, dom); got != c.onA {
				t.Errorf("source host: domain %q, want %q (all: %v)", got, c.onA, ha.state(t))
			}
			if got := fakeStateOf(t, hb, dom); got != c.onB {
				t.Errorf("target host: domain %q, want %q (all: %v)", got, c.onB, hb.state(t))
			}
			if c.phase == v1.MigrationSucceeded {
				r := m.Status.Result
				if r == nil || !r.Verified || r.BytesSent == 0 || r.DedupSavedBytes == 0 || r.BytesSent >= r.MemoryBytes {
					t.Fatalf("result %+v: want verified, link bytes below memory, zero pages saved", r)
				}
				if m.Status.Progress == nil || m.Status.Progress.Percent != 100 {
					t.Errorf("progress %+v, want 100%%", m.Status.Progress)
				}
				waitDomainOn(t, ns, dom, b, 20*time.Second)
				// The target took the same object over: its namespace and
				// labels live on it and follow the domain.
				after := &v1.XenDomain{}
				if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: dom}, after); err != nil || after.UID != before.UID {
					t.Errorf("XenDomain after the move: %v, UID %s (was %s): it was recreated, not taken over", err, after.UID, before.UID)
				}
			}
			// Nothing of the migration is left on the source's disk.
			left, _ := filepath.Glob(filepath.Join(os.TempDir(), "*", "xl", string(m.UID), "auth.json"))
			if c.phase == v1.MigrationSucceeded && len(left) > 0 {
				t.Errorf("the migration's credentials stay on disk: %v", left)
			}
		})
	}
}

// fakeStateOf is the state of a domain on a stand-in host, whatever xl's
// migration suffix it carries ("" when absent).
func fakeStateOf(t *testing.T, h fakeXLHost, name string) string {
	t.Helper()
	var found []string
	for n, st := range h.state(t) {
		if fakeBaseName(n) == name {
			found = append(found, fmt.Sprintf("%s=%s", strings.TrimPrefix(n, name), st))
		}
	}
	switch len(found) {
	case 0:
		return ""
	case 1:
		if s, ok := strings.CutPrefix(found[0], "="); ok {
			return s
		}
	}
	return strings.Join(found, ",")
}
