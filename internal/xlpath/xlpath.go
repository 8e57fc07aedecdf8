// Package xlpath drives stock Xen's `xl migrate` as a data path of the
// node agent: the agent runs xl on the source, xl runs xenferry's transport
// (`node-agent xl-send`) as its -s command, and the transport reports its
// progress and the point of no return through a file this package reads.
//
// What xl does on each failure (xl 4.17, tools/xl/xl_migrate.c, checked
// against the messages of the lab's binary) decides what the agent must do:
//
//   - the transport dies, or the target fails, before the sender's
//     permission to go: xl resumes the domain at the sender itself
//     ("Migration failed, resuming at sender" / "Resumed OK"): the domain
//     runs here, nothing runs there (migrate-receive destroys its copy);
//   - the permission to go was sent and no report came back: xl leaves the
//     domain suspended here, renamed NAME--migratedaway ("Migration failed
//     during final handshake ... CHECK AT BOTH ENDS"); whether the target
//     runs it decides: the target's verdict, never a guess;
//   - the target reports success: xl destroys the domain here.
//
// Nothing here imports Kubernetes.
package xlpath

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
)

// MigratedAwaySuffix is what xl appends to a domain's name when it leaves
// it suspended after a failed final handshake.
const MigratedAwaySuffix = "--migratedaway"

// Progress is what the transport writes to its progress file.
type Progress struct {
	// PID of the transport process: SIGTERM asks it to abort, which it
	// does only before the permission to go.
	PID           int   `json:"pid"`
	StreamBytes   int64 `json:"streamBytes"` // bytes xl produced
	LinkBytes     int64 `json:"linkBytes"`   // bytes sent on the link
	ZeroPages     int64 `json:"zeroPages"`
	RefPages      int64 `json:"refPages"` // sent as references to the shared disk
	DataPages     int64 `json:"dataPages"`
	FallbackPages int64 `json:"fallbackPages"`
	// StreamDone: xl's stream reached libxl's END record (the last round
	// was sent while the domain was suspended).
	StreamDone bool `json:"streamDone,omitempty"`
	// Committed: the permission to go was about to be sent. Written with
	// fsync before any byte of it leaves, so a restarted agent never takes
	// a committed migration for an uncommitted one.
	Committed bool `json:"committed,omitempty"`
	// PostCopy: early resume; xl is done (the domain runs at the target)
	// and the held pages are still being sent.
	PostCopy bool   `json:"postCopy,omitempty"`
	Error    string `json:"error,omitempty"`
}

// maxProgressFile bounds what ReadProgress reads.
const maxProgressFile = 64 << 10

// WriteProgress replaces the progress file atomically; durable also syncs
// the file and its directory before returning.
func WriteProgress(path string, p Progress, durable bool) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write progress %s: %w", path, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("write progress %s: %w", path, err)
	}
	if durable {
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("sync progress %s: %w", path, err)
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write progress %s: %w", path, err)
	}
	if durable {
		if d, err := os.Open(filepath.Dir(path)); err == nil {
			err = d.Sync()
			d.Close()
			if err != nil {
				return fmt.Errorf("sync %s: %w", filepath.Dir(path), err)
			}
		}
	}
	return nil
}

// ReadProgress reads a progress file; a missing file is a zero Progress.
func ReadProgress(path string) (Progress, error) {
	var p Progress
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return p, nil
	}
	if err != nil {
		return p, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxProgressFile+1))
	if err != nil {
		return p, err
	}
	if len(b) > maxProgressFile {
		return p, fmt.Errorf("progress file %s is over %d bytes", path, maxProgressFile)
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("progress file %s: %w", path, err)
	}
	return p, nil
}

// Outcome is how an xl migration ended, for the source.
type Outcome string

const (
	// Migrated: xl reported success; the domain runs on the target and is
	// gone here.
	Migrated Outcome = "Migrated"
	// ResumedHere: it failed before the permission to go and xl resumed
	// the domain here (or never suspended it).
	ResumedHere Outcome = "ResumedHere"
	// Undecided: it failed after the permission to go; the domain is left
	// suspended here as NAME--migratedaway until the target's verdict.
	Undecided Outcome = "Undecided"
	// Unknown: xl's messages say neither; the caller must look at the
	// domains (xl list) on both hosts before doing anything.
	Unknown Outcome = "Unknown"
)

// Classify reads xl migrate's exit status and messages. committed is the
// transport's record of the permission to go; when xl's messages are
// missing it decides between ResumedHere and Undecided.
func Classify(exit int, messages string, committed bool) Outcome {
	switch {
	case exit == 0:
		// xl exits 0 only after the target reported a successful start
		// ("Migration successful").
		return Migrated
	case strings.Contains(messages, "Migration failed during final handshake"):
		return Undecided
	case strings.Contains(messages, "Resumed OK"),
		strings.Contains(messages, "failed to suspend at sender"):
		return ResumedHere
	case committed:
		return Undecided
	}
	return Unknown
}

// Migration is one `xl migrate` run.
type Migration struct {
	// XL is the xl command ("xl" on PATH by default).
	XL string
	// Domain is the domain's name.
	Domain string
	// Host is the HOST argument: xl passes it to the transport, which
	// connects there.
	Host string
	// Transport is the -s command (shell words); xl appends HOST and the
	// remote `xl migrate-receive` command.
	Transport string
	// Env is added to xl's environment (and so the transport's).
	Env []string
	// ProgressFile is where the transport reports (it is told through
	// Env by the caller).
	ProgressFile string
	// Progress, when set, is called with the transport's report about
	// every PollEvery while xl runs.
	Progress  func(Progress)
	PollEvery time.Duration
	Log       logr.Logger
}

// Result is how a Migration ended.
type Result struct {
	Outcome  Outcome
	Exit     int
	Last     Progress
	Seconds  float64
	Messages string // xl's last messages (bounded)
}

// maxMessages bounds the xl output kept for classification and reports.
const maxMessages = 16 << 10

// Run runs xl migrate and waits for it. Cancelling ctx does not kill xl:
// a killed xl may leave the domain suspended or in log-dirty mode. Cancel
// with Abort, which asks the transport to end the stream before the
// permission to go, after which xl resumes the domain here itself.
func (m Migration) Run(ctx context.Context) (Result, error) {
	xl := m.XL
	if xl == "" {
		xl = "xl"
	}
	if m.PollEvery <= 0 {
		m.PollEvery = 500 * time.Millisecond
	}
	start := time.Now()
	cmd := exec.Command(xl, "migrate", "-s", m.Transport, m.Domain, m.Host)
	cmd.Env = append(os.Environ(), m.Env...)
	out := &tailBuffer{max: maxMessages, log: m.Log.WithName("xl")}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return Result{Outcome: ResumedHere, Exit: -1}, fmt.Errorf("start %s migrate: %w", xl, err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	if m.Progress != nil && m.ProgressFile != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(m.PollEvery)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					if p, err := ReadProgress(m.ProgressFile); err == nil {
						m.Progress(p)
					}
				}
			}
		}()
	}
	werr := cmd.Wait()
	close(done)
	wg.Wait()
	res := Result{Exit: cmd.ProcessState.ExitCode(), Seconds: time.Since(start).Seconds(), Messages: out.String()}
	last, perr := ReadProgress(m.ProgressFile)
	if perr != nil {
		m.Log.Info("Transport progress unreadable", "reason", perr.Error())
	}
	res.Last = last
	res.Outcome = Classify(res.Exit, res.Messages, last.Committed)
	if res.Exit != 0 {
		return res, fmt.Errorf("xl migrate %s to %s: %w (%s)", m.Domain, m.Host, werr, lastLine(res.Messages))
	}
	return res, nil
}

// Abort asks the transport of a running migration to end it before the
// permission to go. It reports false when the transport already recorded
// the commit (or has not started): then nothing is asked.
func Abort(progressFile string) (bool, error) {
	p, err := ReadProgress(progressFile)
	if err != nil {
		return false, err
	}
	if p.Committed || p.PID <= 0 {
		return false, nil
	}
	if err := syscall.Kill(p.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return false, fmt.Errorf("signal transport %d: %w", p.PID, err)
	}
	return true, nil
}

// tailBuffer keeps the last max bytes written and logs each line.
type tailBuffer struct {
	mu   sync.Mutex
	max  int
	b    []byte
	part []byte
	log  logr.Logger
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	t.part = append(t.part, p...)
	for {
		i := bytes.IndexByte(t.part, '\n')
		if i < 0 {
			break
		}
		if line := strings.TrimSpace(string(t.part[:i])); line != "" {
			t.log.Info(line)
		}
		t.part = t.part[i+1:]
	}
	if len(t.part) > t.max {
		t.part = nil // a line this long is not a message of xl's
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
