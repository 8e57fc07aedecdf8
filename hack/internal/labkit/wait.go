package labkit

import (
	"context"
	"fmt"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// WaitFor polls cond every step until it returns true, returns an error
// that retry does not accept, or limit passes. A NotFound error is never
// fatal (what is waited for may not exist yet) and never reported; an
// error retry accepts is retried and, should the wait time out, named in
// its error. A loaded lab machine makes the API server slow at times:
// that must not fail a run, so a harness's waits retry what IsTransient
// accepts. The limit is checked after cond, so cond runs at least once.
func WaitFor(ctx context.Context, limit, step time.Duration, retry func(error) bool, cond func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	var last error
	for {
		ok, err := cond()
		if err != nil && !apierrors.IsNotFound(err) {
			if !retry(err) {
				return err
			}
			last = err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			if last != nil {
				return fmt.Errorf("timed out after %v (last error: %w)", limit, last)
			}
			return fmt.Errorf("timed out after %v", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(step):
		}
	}
}

// IsTransient reports API errors worth retrying within a wait: the API
// server (or etcd behind it) was busy, restarting or slow to answer.
func IsTransient(err error) bool {
	return apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) || apierrors.IsTooManyRequests(err) ||
		apierrors.IsServiceUnavailable(err) || apierrors.IsInternalError(err) || strings.Contains(err.Error(), "connection refused") ||
		strings.Contains(err.Error(), "context deadline exceeded") || strings.Contains(err.Error(), "EOF")
}

// SleepCtx sleeps for d or until ctx ends, whichever comes first.
func SleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
