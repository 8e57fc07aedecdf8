package agent

// The agent mode of xl-send: the node agent runs `xl migrate -s
// "node-agent xl-send ..."` with XENFERRY_XL_AUTH_FILE and
// XENFERRY_XL_PROGRESS_FILE in xl's environment, which xl passes on to its
// transport. Secrets stay off command lines.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/internal/xlpath"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

const (
	xlAuthFileEnv     = "XENFERRY_XL_AUTH_FILE"
	xlProgressFileEnv = "XENFERRY_XL_PROGRESS_FILE"
)

// errAbortedBeforeGo ends the stream when the agent asked for an abort
// before the permission to go was sent.
var errAbortedBeforeGo = errors.New("aborted on request before the permission to go; xl resumes the domain here")

func readAuthFile(path string) (xlpath.Auth, error) {
	var a xlpath.Auth
	f, err := os.Open(path)
	if err != nil {
		return a, fmt.Errorf("auth file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4<<10))
	if err != nil {
		return a, fmt.Errorf("auth file %s: %w", path, err)
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("auth file %s: %w", path, err)
	}
	if a.Migration == "" || len(a.Token) == 0 {
		return a, fmt.Errorf("auth file %s: no migration or token", path)
	}
	return a, nil
}

// xlProgress is xl-send's report to the agent; with no path every method
// is a no-op.
type xlProgress struct {
	path string
	mu   sync.Mutex
	p    xlpath.Progress
	// abort is set by SIGTERM before the commit; commit refuses then.
	abort bool
}

func (x *xlProgress) write(durable bool) error {
	if x.path == "" {
		return nil
	}
	return xlpath.WriteProgress(x.path, x.p, durable)
}

func (x *xlProgress) update(s xlstream.SendStats) {
	if x.path == "" {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.take(s)
	_ = x.write(false)
}

// take copies the session's figures; callers hold x.mu.
func (x *xlProgress) take(s xlstream.SendStats) {
	x.p.StreamBytes, x.p.LinkBytes = s.Reader.Bytes, s.Encode.OutBytes
	x.p.ZeroPages, x.p.RefPages, x.p.DataPages, x.p.FallbackPages = s.Encode.ZeroPages, s.Encode.RefPages, s.Encode.DataPages, s.Encode.FallbackPages
}

// postCopy records that xl is done and the held pages are being pushed.
func (x *xlProgress) postCopy() {
	if x.path == "" {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.p.PostCopy = true
	_ = x.write(false)
}

// commit runs before the permission to go leaves: it records the commit
// durably first, or refuses when an abort was asked for.
func (x *xlProgress) commit() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.p.StreamDone = true
	if x.abort {
		_ = x.write(true)
		return errAbortedBeforeGo
	}
	x.p.Committed = true
	if err := x.write(true); err != nil {
		// Without the record a restarted agent could resume the domain here
		// while the target runs it: do not go.
		x.p.Committed = false
		return fmt.Errorf("record the commit before the permission to go: %w", err)
	}
	return nil
}

func (x *xlProgress) finish(st xlstream.SendStats, err error) {
	if x.path == "" {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.take(st)
	if err != nil {
		x.p.Error = err.Error()
	}
	_ = x.write(true)
}

// abortable returns a context that SIGTERM cancels, but only before the
// commit: after it the handshake must finish whatever the agent wants,
// since the target may already run the domain.
func (x *xlProgress) abortable(ctx context.Context, log logr.Logger) (context.Context, func()) {
	if x.path == "" {
		return ctx, func() {}
	}
	// main's context ends on SIGTERM too; in agent mode only the handler
	// below decides, so that a commit is never cut short.
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-sig:
				x.mu.Lock()
				committed := x.p.Committed
				if !committed {
					x.abort = true
				}
				x.mu.Unlock()
				if committed {
					log.Info("Ignored an abort request: the permission to go was sent")
					continue
				}
				log.Info("Aborting before the permission to go, on request")
				cancel(errAbortedBeforeGo)
			}
		}
	}()
	return ctx, func() { signal.Stop(sig); close(done); cancel(nil) }
}
