// Package testlog gives tests a logr.Logger that prints through t.Log.
//
// Unlike testr, it never panics when a goroutine logs after its test has
// ended: controller-runtime's manager, for one, logs from a goroutine it does
// not wait for ("Stopping and waiting for warmup runnables"), and the
// testing package turns any t.Log after the test into a panic of the whole
// test binary. Lines logged after the test's cleanups have started to run
// the last of them are dropped instead.
package testlog

import (
	"sync"
	"testing"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// New returns a logger for t at verbosity 0. Its cleanup is registered now,
// so it runs after the cleanups of everything started later with it.
func New(t testing.TB) logr.Logger {
	var mu sync.RWMutex
	ended := false
	t.Cleanup(func() {
		mu.Lock()
		ended = true
		mu.Unlock()
	})
	return funcr.New(func(prefix, args string) {
		// The read lock spans t.Log, so the cleanup above cannot let the test
		// end between the check and the call.
		mu.RLock()
		defer mu.RUnlock()
		if ended {
			return
		}
		if prefix != "" {
			args = prefix + ": " + args
		}
		t.Log(args)
	}, funcr.Options{Verbosity: 0})
}
