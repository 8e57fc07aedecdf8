package main

import (
	"context"
	"fmt"
	"time"

	kerrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// object is a pointer to an API type.
type object[T any] interface {
	*T
	client.Object
}

// follow reads the object, calls changed with it, and again each time the
// API server reports a change, until changed says done, returns an error,
// or ctx ends (errInterrupted). It uses the API's watch on that one object
// and falls back to reading it every pollInterval when the watch is
// refused. A watch the server ends is started again from a fresh read.
func follow[T any, P object[T]](ctx context.Context, o *options, key client.ObjectKey, list client.ObjectList,
	kind string, changed func(P) (done bool, err error)) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	poll, first := false, true
	for {
		var obj P = new(T)
		if err := c.Get(ctx, key, obj); err != nil {
			if ctx.Err() != nil {
				return errInterrupted
			}
			if kerrors.IsNotFound(err) && !first {
				return fmt.Errorf("%s %q is gone (deleted while watching)", kind, key.Name)
			}
			return explain(err, "read", kind, key.Namespace, key.Name)
		}
		first = false
		if done, err := changed(obj); done || err != nil {
			return err
		}
		if !poll {
			w, err := c.Watch(ctx, list, client.InNamespace(key.Namespace), &client.ListOptions{Raw: &metav1.ListOptions{
				FieldSelector:   "metadata.name=" + key.Name,
				ResourceVersion: obj.GetResourceVersion(),
			}})
			if err == nil {
				done, err := drainEvents[T, P](ctx, w, kind, key.Name, changed)
				w.Stop()
				if done || err != nil {
					return err
				}
				// The server closed the watch or it expired: read again
				// after a pause, so that a watch that keeps failing at
				// once costs no more than a poll.
			} else {
				if ctx.Err() != nil {
					return errInterrupted
				}
				// No watch (RBAC without watch, a proxy that cuts
				// streams): a bounded poll instead.
				poll = true
			}
		}
		select {
		case <-ctx.Done():
			return errInterrupted
		case <-time.After(o.pollInterval):
		}
	}
}

// drainEvents hands each change to changed until done, an error, the end of
// the watch (false, nil) or ctx (errInterrupted).
func drainEvents[T any, P object[T]](ctx context.Context, w watch.Interface, kind, name string,
	changed func(P) (bool, error)) (bool, error) {
	for {
		select {
		case <-ctx.Done():
			return true, errInterrupted
		case ev, ok := <-w.ResultChan():
			if !ok {
				return false, nil
			}
			switch ev.Type {
			case watch.Added, watch.Modified:
				obj, ok := ev.Object.(P)
				if !ok {
					continue
				}
				if done, err := changed(obj); done || err != nil {
					return done, err
				}
			case watch.Deleted:
				return true, fmt.Errorf("%s %q was deleted while watching", kind, name)
			case watch.Error:
				// Expired resource version and the like: read again.
				return false, nil
			}
		}
	}
}
