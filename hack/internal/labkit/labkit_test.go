package labkit

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

func TestCleanEnv(t *testing.T) {
	t.Setenv("ETCD_NAME", "x")
	t.Setenv("XENFERRY_FAILPOINTS_FILE", "/f")
	t.Setenv("KUBECONFIG", "/k")
	t.Setenv("POD_NAMESPACE", "p")
	t.Setenv("LABKIT_KEEP", "1")
	env := CleanEnv(append(EnvDrop[:len(EnvDrop):len(EnvDrop)], "POD_NAMESPACE="), "XENFERRY_X=extra")
	joined := "\n" + strings.Join(env, "\n") + "\n"
	for _, gone := range []string{"ETCD_NAME=", "XENFERRY_FAILPOINTS_FILE=", "KUBECONFIG=", "POD_NAMESPACE="} {
		if strings.Contains(joined, "\n"+gone) {
			t.Errorf("%s inherited", gone)
		}
	}
	if !strings.Contains(joined, "\nLABKIT_KEEP=1\n") {
		t.Error("LABKIT_KEEP dropped")
	}
	if env[len(env)-1] != "XENFERRY_X=extra" {
		t.Errorf("extra not last and unfiltered: %q", env[len(env)-1])
	}
}

func TestWaitFor(t *testing.T) {
	ctx := context.Background()
	notFound := apierrors.NewNotFound(schema.GroupResource{Resource: "xenhosts"}, "h")
	busy := apierrors.NewServiceUnavailable("busy")
	fatal := errors.New("agent exited")

	n := 0
	err := WaitFor(ctx, time.Second, time.Millisecond, IsTransient, func() (bool, error) {
		n++
		switch n {
		case 1:
			return false, notFound
		case 2:
			return false, busy
		}
		return true, nil
	})
	if err != nil || n != 3 {
		t.Errorf("NotFound and a transient error are retried: err %v after %d tries", err, n)
	}
	if err := WaitFor(ctx, time.Second, time.Millisecond, IsTransient, func() (bool, error) { return false, fatal }); !errors.Is(err, fatal) {
		t.Errorf("a fatal error ends the wait: %v", err)
	}
	err = WaitFor(ctx, 5*time.Millisecond, time.Millisecond, IsTransient, func() (bool, error) { return false, busy })
	if err == nil || !strings.Contains(err.Error(), "timed out after 5ms (last error:") || !apierrors.IsServiceUnavailable(errors.Unwrap(err)) {
		t.Errorf("a timeout names the last transient error: %v", err)
	}
	conflict := apierrors.NewConflict(schema.GroupResource{Resource: "xenhosts"}, "h", errors.New("stale"))
	if IsTransient(conflict) {
		t.Error("a conflict is not transient by default")
	}
	retryConflict := func(err error) bool { return IsTransient(err) || apierrors.IsConflict(err) }
	n = 0
	if err := WaitFor(ctx, time.Second, time.Millisecond, retryConflict, func() (bool, error) {
		n++
		return n > 1, conflict
	}); err != nil {
		t.Errorf("retry decides what is retried: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := WaitFor(cctx, time.Second, time.Millisecond, IsTransient, func() (bool, error) { return false, nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("an ended context ends the wait: %v", err)
	}
}

func TestText(t *testing.T) {
	if got := Clip("a\nbcdef", 4); got != "a bc…" {
		t.Errorf("Clip = %q", got)
	}
	if got := Clip("abc", 4); got != "abc" {
		t.Errorf("Clip of a short string = %q", got)
	}
	if got := Round1(2.25); got != 2.3 {
		t.Errorf("Round1(2.25) = %v", got)
	}
	if PhaseOf(nil) != "?" || PhaseOf(&v1.VMMigration{}) != "Pending" {
		t.Error("PhaseOf of no migration or one without a phase")
	}
	m := &v1.VMMigration{}
	m.Status.Phase = v1.MigrationSucceeded
	if PhaseOf(m) != string(v1.MigrationSucceeded) {
		t.Errorf("PhaseOf = %q", PhaseOf(m))
	}
}

func TestProcs(t *testing.T) {
	ps := &Procs{LogDir: t.TempDir()}
	p, err := ps.Start("sleeper", nil, "/bin/sh", "-c", "echo started; exec sleep 60")
	if err != nil {
		t.Fatal(err)
	}
	if err := WaitFor(context.Background(), 10*time.Second, 10*time.Millisecond, IsTransient, func() (bool, error) {
		return strings.Contains(p.Tail(100), "started"), nil
	}); err != nil {
		t.Fatalf("no output in the log: %v", err)
	}
	if !p.Alive() || p.PID() <= 0 {
		t.Fatal("the process should run")
	}
	ps.StopAll()
	if p.Alive() {
		t.Fatal("StopAll left the process running")
	}
	ps.StopAll() // a second call is harmless
}
