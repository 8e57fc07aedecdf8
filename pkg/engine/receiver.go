package engine

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/postcopy"
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
	// EventRecovering: the link broke during post-copy; the domain runs
	// here and waits for the source to reconnect.
	EventRecovering EventKind = "Recovering"
	// EventDiscarded: the domain had resumed here but its memory failed
	// verification; it was destroyed here and will never run here again,
	// and the source was told so ("discarded") and may resume its copy.
	EventDiscarded EventKind = "Discarded"
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
	// FaultLatency is the post-copy fault latency histogram (every demand
	// fault, fault to page in place); nil when the migration had no
	// post-copy phase. Read-only for the event's consumer.
	FaultLatency *postcopy.Histogram
}

// AuthRequest is what a new connection presents to Receiver.Authorize.
type AuthRequest struct {
	MigrationID string
	// Role is the connection's role: "main", "data", "prio" or "recover".
	Role  string
	Token []byte
	// PeerHost is the verified TLS identity of the peer (the CommonName of
	// its verified leaf certificate); "" when the connection is not TLS.
	PeerHost string
}

// Grant is what the destination's authority (the agent, from the API)
// allows an authorised migration to create here.
type Grant struct {
	// Domain is the target side's view of the domain: name, memory bytes,
	// vCPUs, disks with THIS host's paths and IDs. The session creates the
	// target from it; the sender's header configuration is only
	// cross-checked (name, memory) and, when Domain.Config is empty, passed
	// to the backend as its opaque configuration, from which the backend
	// takes nothing that names a host resource (disks and memory come from
	// Domain).
	Domain xenmem.DomainInfo
	// SourceHost is the host the migration comes from.
	SourceHost string
}

// Defaults of the Receiver's limits.
const (
	// DefaultMaxPages bounds a domain received without a grant: 2^26
	// pages, 256 GiB. A post-copy's missing-page bitmap travels as one
	// record of at most wire.MaxBody bytes, which covers about 258 GiB, so
	// no larger domain can migrate with every strategy anyway; the
	// destination's per-page state for it is 32 bytes a page, 2 GiB.
	DefaultMaxPages = 1 << 26
	// DefaultIdleTimeout: a source that sends nothing on any of a
	// migration's connections for this long while the destination waits
	// for it is gone.
	DefaultIdleTimeout = 20 * time.Second
	// DefaultWriteTimeout bounds one record written to a source.
	DefaultWriteTimeout = 20 * time.Second
	// DefaultMaxPreAuth bounds connections not authorised yet.
	DefaultMaxPreAuth = 32
	// DefaultMaxSessions bounds concurrent incoming migrations.
	DefaultMaxSessions = 8
)

// Receiver accepts incoming migrations on a listener. One Receiver serves
// every migration of an agent.
type Receiver struct {
	Host xenmem.Host
	// Authorize checks a connection's migration ID, token and peer, and
	// returns what the migration may create here. nil is the anonymous
	// standalone mode (tests, a lab): every migration is accepted and the
	// sender's configuration is used, still within MaxPages.
	Authorize func(ctx context.Context, req AuthRequest) (*Grant, error)
	// Events, if set, is told about every migration's progress.
	Events func(migrationID string, ev Event)
	// Verified, if set, is called once every page of a post-copy matched
	// the manifest and before "done" tells the source it may release its
	// copy: from then on this host's domain is the only one, so the agent
	// records the fact durably here, where a restarted agent finds it.
	// An error keeps "done" from being sent; the source then holds its
	// paused copy until the target's half says completed.
	Verified func(migrationID string) error
	// DiskPath maps a domain's disk to this host's view of it in anonymous
	// mode; nil uses the path from the sender's configuration. With a
	// grant, disks are the grant's, resolved by ID.
	DiskPath func(domain string, d xenmem.Disk) string
	Log      logr.Logger
	// MaxSessions bounds concurrent incoming migrations (default
	// DefaultMaxSessions).
	MaxSessions int
	// MaxPreAuth bounds connections that have not been authorised yet;
	// more are closed at once (default DefaultMaxPreAuth).
	MaxPreAuth int
	// MaxPages bounds the pages of a received domain, grant or not
	// (default DefaultMaxPages).
	MaxPages uint64
	// IdleTimeout: how long the destination waits for any byte from the
	// source, on any of the migration's connections, while it waits for
	// the source (default DefaultIdleTimeout). Renewed by every byte, so a
	// long phase that carries data never trips it. It must exceed the
	// source's own pauses: a batch of wire.MaxBatchPages pages (4 MiB)
	// waits for the link's bandwidth before it is written, 4 s at 1 MiB/s.
	IdleTimeout time.Duration
	// WriteTimeout bounds each record written to a source (default
	// DefaultWriteTimeout).
	WriteTimeout time.Duration
	// DurableDir is this host's path of the shared directory where sources
	// mirror post-copy pages (Options.DurableDir on the source); when the
	// source does not come back, the destination finishes from the mirror.
	DurableDir string
	// RecoveryTimeout bounds how long a post-copy whose link broke waits
	// for the source to reconnect (default RecoveryTimeout).
	RecoveryTimeout time.Duration

	mu       sync.Mutex
	sessions map[string]*session // by migration ID; bounded by MaxSessions
	preAuth  chan struct{}       // one token per connection not authorised yet
}

// maxHelloBody bounds the records of a connection not authorised yet (its
// hello: a migration ID, a token, a role).
const maxHelloBody = 16 << 10

// handshakeTimeout bounds the TLS handshake, stream header and hello of a
// new connection.
const handshakeTimeout = 10 * time.Second

func (r *Receiver) idleTimeout() time.Duration {
	if r.IdleTimeout > 0 {
		return r.IdleTimeout
	}
	return DefaultIdleTimeout
}

func (r *Receiver) writeTimeout() time.Duration {
	if r.WriteTimeout > 0 {
		return r.WriteTimeout
	}
	return DefaultWriteTimeout
}

func (r *Receiver) maxPages() uint64 {
	if r.MaxPages > 0 {
		return r.MaxPages
	}
	return DefaultMaxPages
}

// Serve accepts connections until ctx ends or the listener fails. At most
// MaxPreAuth connections wait for their authorisation at a time; more are
// closed at once, before anything is read from them.
func (r *Receiver) Serve(ctx context.Context, ln net.Listener) error {
	limit := r.MaxPreAuth
	if limit <= 0 {
		limit = DefaultMaxPreAuth
	}
	r.mu.Lock()
	if r.preAuth == nil {
		r.preAuth = make(chan struct{}, limit)
	}
	preAuth := r.preAuth
	r.mu.Unlock()
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
		select {
		case preAuth <- struct{}{}:
		default:
			r.Log.Info("Refused a connection: too many unauthorised connections", "remote", c.RemoteAddr().String(), "limit", cap(preAuth))
			c.Close()
			continue
		}
		var once sync.Once
		release := func() { once.Do(func() { <-preAuth }) }
		go func() {
			defer release()
			r.handle(ctx, c, release)
		}()
	}
}

// recovered turns a panic into an error, logged with its stack: no input
// from the network may take the agent down.
func (r *Receiver) recovered(p any, what string, kv ...any) error {
	err := fmt.Errorf("%w: %s: panic: %v", ErrInternal, what, p)
	r.Log.Error(err, "Recovered from a panic", append(kv, "stack", string(debug.Stack()))...)
	return err
}

// peerHost completes the TLS handshake of a TLS connection (bounded by the
// handshake deadline) and returns the CommonName of the peer's verified
// leaf certificate; "" for a connection that is not TLS.
func peerHost(ctx context.Context, nc net.Conn) (string, error) {
	tc, ok := nc.(*tls.Conn)
	if !ok {
		return "", nil
	}
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		return "", fmt.Errorf("TLS handshake: %w", err)
	}
	host := pki.PeerHost(tc.ConnectionState())
	if host == "" {
		return "", errors.New("TLS peer presented no verified certificate naming a host")
	}
	return host, nil
}

// handle reads a connection's hello and routes it to its session. release
// gives back the connection's pre-authorisation slot.
func (r *Receiver) handle(ctx context.Context, nc net.Conn, release func()) {
	var hello wire.Control
	defer func() {
		if p := recover(); p != nil {
			_ = r.recovered(p, "serve a migration connection", "remote", nc.RemoteAddr().String(), "migration", hello.MigrationID)
			nc.Close()
		}
	}()
	_ = nc.SetReadDeadline(time.Now().Add(handshakeTimeout))
	c := newConn(nc, nil, false)
	c.wto = r.writeTimeout()
	// Until authorised, a connection gets no more than a hello needs.
	c.r.SetMaxBody(maxHelloBody)
	var grant *Grant
	hello, err := func() (wire.Control, error) {
		peer, err := peerHost(ctx, nc)
		if err != nil {
			return wire.Control{}, err
		}
		if err := c.r.ReadStreamHeader(); err != nil {
			return wire.Control{}, err
		}
		m, err := readControl(c)
		if err != nil {
			return m, err
		}
		if m.Kind != ctlHello {
			return m, protocolError("first message is %q, not hello", m.Kind)
		}
		if r.Authorize != nil {
			actx, cancel := context.WithTimeout(ctx, handshakeTimeout)
			defer cancel()
			grant, err = r.Authorize(actx, AuthRequest{MigrationID: m.MigrationID, Role: m.Message, Token: m.Token, PeerHost: peer})
			if err == nil && grant == nil && m.Message == roleMain {
				err = errors.New("authorised without a grant")
			}
		}
		return m, err
	}()
	if err != nil {
		r.Log.Info("Refused a migration connection", "remote", nc.RemoteAddr().String(), "migration", hello.MigrationID, "error", err.Error())
		_ = nc.SetReadDeadline(time.Time{})
		c.mu.Lock()
		_ = c.w.WriteStreamHeader()
		c.mu.Unlock()
		_ = c.sendControl(ctx, &wire.Control{Kind: ctlError, Message: "refused: " + err.Error()})
		nc.Close()
		return
	}
	release()
	c.r.SetMaxBody(0)
	_ = nc.SetReadDeadline(time.Time{})
	c.prio = hello.Message == rolePrio
	c.mu.Lock()
	_ = c.setWriteDeadline()
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
		s, err = r.newSession(hello, grant)
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
		err = protocolError("unknown stream role %q", hello.Message)
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

func (r *Receiver) newSession(hello wire.Control, grant *Grant) (*session, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions == nil {
		r.sessions = map[string]*session{}
	}
	limit := r.MaxSessions
	if limit <= 0 {
		limit = DefaultMaxSessions
	}
	if _, dup := r.sessions[hello.MigrationID]; dup {
		return nil, fmt.Errorf("migration %q is already being received", hello.MigrationID)
	}
	if len(r.sessions) >= limit {
		return nil, fmt.Errorf("too many incoming migrations (%d); retry later", limit)
	}
	if hello.Streams < 1 || hello.Streams > 64 {
		return nil, protocolError("bad stream count %d", hello.Streams)
	}
	s := newSession(r, hello, grant)
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

// emit tells Events about ev. A panic in the callback is logged, not
// raised: emit runs in cleanups that must finish.
func (r *Receiver) emit(id string, ev Event) {
	if r.Events == nil {
		return
	}
	defer func() {
		if p := recover(); p != nil {
			_ = r.recovered(p, "report an event", "migration", id, "kind", ev.Kind)
		}
	}()
	r.Events(id, ev)
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
