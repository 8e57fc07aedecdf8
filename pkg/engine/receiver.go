package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// EventKind says what happened to an incoming migration.
type EventKind string

const (
	EventPrepared EventKind = "Prepared" // target domain created, receiving
	EventResumed  EventKind = "Resumed"  // the domain runs here (point of no return)
	EventDone     EventKind = "Done"     // every page here and verified
	EventFailed   EventKind = "Failed"   // aborted; nothing left behind if before Resumed
	// EventDiscarded: the domain had resumed here and was destroyed (it
	// never runs here again); the source was told "discarded".
	EventDiscarded EventKind = "Discarded"
	// EventRecovering: the link broke during post-copy; the domain runs
	// here and waits for the source to reconnect.
	EventRecovering EventKind = "Recovering"
)

// Event is reported by a Receiver for each incoming migration.
type Event struct {
	Kind   EventKind
	Domain string
	Err    error
	Stats  ReceiveStats
}

// ReceiveStats are the destination's figures.
type ReceiveStats struct {
	Verified     bool
	Pages        uint64
	Demand       uint64
	DiskResolved uint64
	DiskFallback uint64
	FaultP50     time.Duration
	FaultP99     time.Duration
}

// Receiver accepts incoming migrations on a listener. One Receiver serves
// every migration of an agent.
type Receiver struct {
	Host xenmem.Host
	// Authorize checks the migration's token; nil accepts every migration
	// (standalone mode on a trusted network).
	Authorize func(migrationID string, token []byte) error
	// Events, if set, is told about every migration's progress.
	Events func(migrationID string, ev Event)
	// DiskPath maps a domain's disk to this host's view of it; nil uses the
	// path from the domain's configuration.
	DiskPath func(domain string, d xenmem.Disk) string
	Log      logr.Logger
	// MaxSessions bounds concurrent incoming migrations (default 8).
	MaxSessions int
	// DurableDir is this host's path of the shared directory where sources
	// mirror post-copy pages (Options.DurableDir on the source); when the
	// source does not come back, the destination finishes from the mirror.
	DurableDir string
	// RecoveryTimeout bounds how long a post-copy whose link broke waits
	// for the source to reconnect (default RecoveryTimeout).
	RecoveryTimeout time.Duration

	mu       sync.Mutex
	sessions map[string]*session // by migration ID; bounded by MaxSessions
}

// handshakeTimeout bounds the stream header and hello of a new connection.
const handshakeTimeout = 10 * time.Second

// Serve accepts connections until ctx ends or the listener fails.
func (r *Receiver) Serve(ctx context.Context, ln net.Listener) error {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		go r.handle(ctx, c)
	}
}

// handle reads a connection's hello and routes it to its session.
func (r *Receiver) handle(ctx context.Context, nc net.Conn) {
	_ = nc.SetReadDeadline(time.Now().Add(handshakeTimeout))
	c := newConn(nc, nil, false)
	hello, err := func() (wire.Control, error) {
		if err := c.r.ReadStreamHeader(); err != nil {
			return wire.Control{}, err
		}
		m, err := readControl(c)
		if err != nil {
			return m, err
		}
		if m.Kind != ctlHello {
			return m, fmt.Errorf("first message is %q, not hello: %w", m.Kind, wire.ErrMalformed)
		}
		return m, nil
	}()
	if err == nil && r.Authorize != nil {
		err = r.Authorize(hello.MigrationID, hello.Token)
	}
	if err != nil {
		r.Log.Info("Refused a migration connection", "remote", nc.RemoteAddr().String(), "migration", hello.MigrationID, "error", err.Error())
		c.mu.Lock()
		_ = c.w.WriteStreamHeader()
		c.mu.Unlock()
		_ = c.sendControl(ctx, &wire.Control{Kind: ctlError, Message: "refused: " + err.Error()})
		nc.Close()
		return
	}
	_ = nc.SetReadDeadline(time.Time{})
	c.prio = hello.Message == rolePrio
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(c.prio)
	}
	c.mu.Lock()
	err = c.w.WriteStreamHeader()
	c.mu.Unlock()
	if err != nil {
		nc.Close()
		return
	}
	// Route before welcoming, so that a welcomed main connection has its
	// session registered before the source opens the others.
	var s *session
	switch hello.Message {
	case roleMain:
		s, err = r.newSession(hello)
	case roleData, rolePrio:
		if s = r.lookup(hello.MigrationID); s == nil || !s.attach(c, hello) {
			err = fmt.Errorf("no migration %q waiting for a %s stream %d", hello.MigrationID, hello.Message, hello.Stream)
		}
	case roleRecover:
		if s = r.lookup(hello.MigrationID); s == nil {
			err = fmt.Errorf("no migration %q to recover", hello.MigrationID)
		} else if err = s.beginRecovery(ctx, c); err == nil {
			return // welcomed by beginRecovery; the session owns c now
		} else if errors.Is(err, errWelcomed) {
			nc.Close()
			return
		}
	default:
		err = fmt.Errorf("unknown stream role %q", hello.Message)
	}
	if err != nil {
		_ = c.sendControl(ctx, &wire.Control{Kind: ctlError, Message: err.Error()})
		nc.Close()
		return
	}
	if err := c.sendControl(ctx, &wire.Control{Kind: ctlHello, MigrationID: hello.MigrationID}); err != nil {
		nc.Close() // a data stream: the session notices it missing
		if hello.Message == roleMain {
			r.drop(hello.MigrationID)
		}
		return
	}
	if hello.Message == roleMain {
		s.main = c
		s.run(ctx)
	}
}

func (r *Receiver) recoveryTimeout() time.Duration {
	if r.RecoveryTimeout > 0 {
		return r.RecoveryTimeout
	}
	return RecoveryTimeout
}

func (r *Receiver) newSession(hello wire.Control) (*session, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions == nil {
		r.sessions = map[string]*session{}
	}
	limit := r.MaxSessions
	if limit <= 0 {
		limit = 8
	}
	if _, dup := r.sessions[hello.MigrationID]; dup {
		return nil, fmt.Errorf("migration %q is already being received", hello.MigrationID)
	}
	if len(r.sessions) >= limit {
		return nil, fmt.Errorf("too many incoming migrations (%d); retry later", limit)
	}
	if hello.Streams < 1 || hello.Streams > 64 {
		return nil, fmt.Errorf("bad stream count %d: %w", hello.Streams, wire.ErrMalformed)
	}
	s := newSession(r, hello)
	r.sessions[hello.MigrationID] = s
	return s, nil
}

func (r *Receiver) lookup(id string) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[id]
}

func (r *Receiver) drop(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.sessions, id)
}

func (r *Receiver) emit(id string, ev Event) {
	if r.Events != nil {
		r.Events(id, ev)
	}
}

// decodeInfo reads the domain configuration from the header.
func decodeInfo(h wire.Header) (xenmem.DomainInfo, error) {
	var info xenmem.DomainInfo
	if h.PageShift != xenmem.PageShift {
		return info, fmt.Errorf("page shift %d, this host uses %d: %w", h.PageShift, xenmem.PageShift, wire.ErrMalformed)
	}
	if err := json.Unmarshal(h.Config, &info); err != nil {
		return info, fmt.Errorf("domain config: %w", err)
	}
	if info.MemoryBytes != h.NumPages*xenmem.PageSize {
		return info, fmt.Errorf("domain %s: config says %d bytes, header %d pages: %w", info.Name, info.MemoryBytes, h.NumPages, wire.ErrMalformed)
	}
	return info, nil
}
