package agent

// xl-send and xl-recv make node-agent the transport of stock Xen's
// `xl migrate -s CMD`: xl runs `CMD HOST xl migrate-receive ...` and uses
// its stdin/stdout as the migration stream. On the source
//
//	xl migrate -s "node-agent xl-send" DOMAIN HOST
//
// connects to `node-agent xl-recv --listen :7070` on HOST, which runs
// `xl migrate-receive` there. Both ends authenticate each other with
// mutual TLS (--tls-cert/--tls-key/--tls-ca; `node-agent pki` makes lab
// certificates); --insecure-allow-anonymous opts out, loudly. The stream goes through pkg/xlstream: zero
// pages and pages found on the domain's shared disks cross the link as
// references, and the destination rebuilds the exact stream for its xl.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/internal/xlpath"
	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/pace"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

const defaultXLPort = 7070

// xlSendReport is what xl-send writes to --report (one JSON object).
type xlSendReport struct {
	Host          string  `json:"host"`
	OK            bool    `json:"ok"`
	Error         string  `json:"error,omitempty"`
	Seconds       float64 `json:"seconds"`
	StreamBytes   int64   `json:"streamBytes"` // bytes xl produced
	LinkBytes     int64   `json:"linkBytes"`   // frame bytes we sent
	PageRecords   int64   `json:"pageRecords"`
	ZeroPages     int64   `json:"zeroPages"`
	RefPages      int64   `json:"refPages"`
	DataPages     int64   `json:"dataPages"`
	FallbackPages int64   `json:"fallbackPages"`
	IndexSeconds  float64 `json:"indexSeconds"`
	Disks         int     `json:"disks"`
	ExitStatus    int     `json:"exitStatus"`
	// Early resume: pages held back, then sent on demand and pushed.
	// Compression (--compress): records sent as zstd frames, and their
	// payload (REFs and full pages) offered and sent.
	CompressedRecords int64 `json:"compressedRecords,omitempty"`
	PayloadBytes      int64 `json:"payloadBytes,omitempty"`
	PayloadSentBytes  int64 `json:"payloadSentBytes,omitempty"`
	// Compressor: its counters and the estimates its decisions rest on.
	Compressor   *wire.CompressorStats `json:"compressor,omitempty"`
	LazyHeld     int64                 `json:"lazyHeld,omitempty"`
	LazyDemanded int64                 `json:"lazyDemanded,omitempty"`
	LazyPushed   int64                 `json:"lazyPushed,omitempty"`
	// LazyPushedCompressed of the pushed pages went in zstd batches.
	LazyPushedCompressed int64 `json:"lazyPushedCompressed,omitempty"`
}

// XLSend is `node-agent xl-send`, the transport `xl migrate -s` runs on
// the source: it dedups the libxc stream against the domain's disks and
// carries it to xl-recv (or the agent's data port) on the target.
func XLSend(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("xl-send", flag.ContinueOnError)
	port := fs.Int("port", defaultXLPort, "port of node-agent xl-recv on HOST")
	stateDir := fs.String("state-dir", "/var/lib/xenferry", "where dedup indexes persist")
	noDedup := fs.Bool("no-dedup", false, "do not look pages up on the shared disks (zero pages are still elided)")
	report := fs.String("report", "", "write a JSON summary to this file")
	verbose := fs.Int("v", 0, "log verbosity")
	serverName := fs.String("server-name", "", "name the receiver's certificate must carry (default: HOST)")
	rateCap := fs.Int64("rate", 0, "bandwidth cap on the link in bytes per second (0: none)")
	compress := fs.Bool("compress", false, "compress page records with zstd where that pays, record by record (by the link's rate, --rate or as measured, and the time spent waiting for xl); HOST's xl-recv must decode them (agents publish it as the capability compression: zstd)")
	compressAlways := fs.Bool("compress-always", false, "send every page record that shrinks compressed, whatever the link's rate (bytes cost more than this dom0's CPU time); implies --compress")
	earlyResume := fs.Bool("early-resume", false, "hold back an HVM/PVH domain's RAM: it runs on HOST once the rest has crossed, and its pages follow on demand and by a push (needs a host that can page: CONFIG_MEM_PAGING)")
	spoolDir := fs.String("spool-dir", defaultSpoolDir, "early resume: where the held pages are kept until HOST has them (storage HOST can read too, so that they survive this process)")
	pushRate := fs.Int64("push-rate", 0, "early resume: pace the push of held pages to this many bytes per second (just below the link's rate keeps demand answers from queueing behind it; 0: unpaced)")
	authFile := fs.String("auth-file", os.Getenv(xlAuthFileEnv), "agent mode: JSON {migration, token} sent before the stream (default $"+xlAuthFileEnv+")")
	progressFile := fs.String("progress-file", os.Getenv(xlProgressFileEnv), "agent mode: where progress and the commit are reported (default $"+xlProgressFileEnv+")")
	var tf tlsFlags
	tf.bind(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 2 {
		return fmt.Errorf("usage: xl-send [flags] HOST xl migrate-receive [ARGS] (as run by xl migrate -s \"node-agent xl-send\" DOMAIN HOST)")
	}
	host, remote := fs.Arg(0), fs.Args()[1:]
	log := stderrLogger(*verbose).WithName("xl-send").WithValues("host", host)
	start := time.Now()
	rep := xlSendReport{Host: host, ExitStatus: -1}
	defer func() {
		rep.Seconds = time.Since(start).Seconds()
		if *report != "" {
			b, _ := json.Marshal(rep)
			_ = os.WriteFile(*report, append(b, '\n'), 0o644)
		}
	}()

	src, err := tf.source(log, "the xl-recv port of "+host)
	if err != nil {
		rep.Error = err.Error()
		return err
	}
	// Agent mode: the agent that ran xl reads the progress file and may ask
	// for an abort with SIGTERM, honoured only before the permission to go.
	var prog xlProgress
	if *progressFile != "" {
		prog.path = *progressFile
		prog.p.PID = os.Getpid()
		if err := prog.write(false); err != nil {
			return err
		}
	}
	ctx, stopSignals := prog.abortable(ctx, log)
	defer stopSignals()
	var auth *xlpath.Auth
	if *authFile != "" {
		a, err := readAuthFile(*authFile)
		if err != nil {
			rep.Error = err.Error()
			return err
		}
		auth = &a
	}
	if *serverName == "" {
		*serverName = host
	}
	addr := net.JoinHostPort(host, fmt.Sprint(*port))
	var conn net.Conn
	if dial := dialFor(src, *serverName); dial != nil {
		conn, err = dial(ctx, addr)
	} else {
		d := net.Dialer{Timeout: dialTimeout}
		conn, err = d.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		rep.Error = err.Error()
		return fmt.Errorf("connect to node-agent xl-recv at %s: %w (is `node-agent xl-recv` running on %s?)", addr, err, host)
	}
	defer conn.Close()
	if *earlyResume {
		// A demand answer queues behind whatever the push left in the
		// socket: a small send buffer keeps that behind it short. The
		// window still covers a dom0-to-dom0 round trip at link speed.
		if tc := engine.TCPConn(conn); tc != nil {
			_ = tc.SetWriteBuffer(128 << 10)
		}
	}
	if auth != nil {
		if err := xlpath.WriteAuth(conn, *auth); err != nil {
			rep.Error = err.Error()
			return fmt.Errorf("authenticate to %s: %w", addr, err)
		}
	}
	if err := xlstream.WriteHello(conn, remote); err != nil {
		rep.Error = err.Error()
		return fmt.Errorf("send hello to %s: %w", addr, err)
	}
	log.Info("Connected", "addr", addr, "remote", strings.Join(remote, " "))

	// The agent's dedup-index cache, loaded from where `run` persists it.
	indexes := newDiskIndexes(*stateDir, log)
	defer indexes.close()
	opts := xlstream.SendOptions{ProgressEvery: 10 * time.Second}
	lastLog := time.Now()
	opts.Progress = func(s xlstream.SendStats) {
		prog.update(s)
		if time.Since(lastLog) >= 10*time.Second {
			lastLog = time.Now()
			log.Info("Sending", "streamMiB", s.Reader.Bytes>>20, "linkMiB", s.Encode.OutBytes>>20,
				"zero", s.Encode.ZeroPages, "ref", s.Encode.RefPages, "data", s.Encode.DataPages)
		}
	}
	if prog.path != "" {
		opts.ProgressEvery = 500 * time.Millisecond
		opts.BeforeTrailer = prog.commit
	}
	if !*noDedup {
		opts.IndexFor = func(h *xlstream.XLHeader) (xlstream.PageIndex, error) {
			disks, err := h.Disks()
			if err != nil {
				log.Info("No disk list in the stream; only zero pages are elided", "reason", err.Error())
				return nil, nil
			}
			t0 := time.Now()
			var list []*dedup.Index
			for _, dk := range disks {
				ix, err := indexes.get(ctx, dk.PdevPath, nil)
				if err != nil {
					// Not fatal: the migration goes on without this disk.
					log.Info("Disk not indexed; its pages are sent in full", "disk", dk.PdevPath, "reason", err.Error())
					list = append(list, nil)
					continue
				}
				rep.Disks++
				list = append(list, ix)
			}
			rep.IndexSeconds = time.Since(t0).Seconds()
			log.Info("Disks indexed", "disks", len(disks), "seconds", rep.IndexSeconds)
			return catalogIndex{dedup.NewCatalog(list...)}, nil
		}
	}
	opts.Compress, opts.CompressLink, opts.CompressAlways = *compress || *compressAlways, *rateCap, *compressAlways
	var link io.ReadWriter = conn
	if b := pace.New(*rateCap, 256<<10, true, "xl-send link"); b != nil {
		link = pacedConn{Conn: conn, ctx: ctx, b: b}
	}
	if *earlyResume {
		name := fmt.Sprintf("xl-send-%s-%d.spool", start.UTC().Format("20060102T150405"), os.Getpid())
		lz, err := xlstream.NewLazySource(*spoolDir, name)
		if err != nil {
			rep.Error = err.Error()
			return err
		}
		opts.Lazy, opts.LazyName, opts.LazyPushRate = lz, name, *pushRate
		opts.LazyPushing = prog.postCopy
		defer func() {
			// The spool goes once HOST has every page (it said so by its
			// exit after the last one); otherwise it may be the domain's
			// only copy of them, and stays.
			if rep.OK {
				_ = lz.Remove()
			} else {
				_ = lz.Close()
				if rep.LazyHeld > 0 {
					log.Info("Spool kept: it may hold the only copy of the domain's pages", "spool", filepath.Join(*spoolDir, name))
				} else {
					_ = os.Remove(filepath.Join(*spoolDir, name))
				}
			}
		}()
		log.Info("Early resume: the RAM of an HVM/PVH domain is held back", "spool", filepath.Join(*spoolDir, name))
	}
	st, err := xlstream.Send(ctx, link, os.Stdin, os.Stdout, nil, opts)
	prog.finish(st, err)
	rep.StreamBytes, rep.LinkBytes = st.Reader.Bytes, st.Encode.OutBytes
	rep.PageRecords, rep.ZeroPages, rep.RefPages = st.Encode.PageRecords, st.Encode.ZeroPages, st.Encode.RefPages
	rep.DataPages, rep.FallbackPages, rep.ExitStatus = st.Encode.DataPages, st.Encode.FallbackPages, st.ExitStatus
	rep.CompressedRecords, rep.PayloadBytes, rep.PayloadSentBytes = st.Encode.CompressedRecords, st.Encode.PayloadBytes, st.Encode.PayloadSentBytes
	if opts.Compress {
		rep.Compressor = &st.Encode.Compressor
	}
	rep.LazyHeld, rep.LazyDemanded, rep.LazyPushed = st.LazyHeld, st.LazyDemanded, st.LazyPushed
	rep.LazyPushedCompressed = st.LazyPushedCompressed
	log.Info("Stream sent", "streamBytes", rep.StreamBytes, "linkBytes", rep.LinkBytes, "zero", rep.ZeroPages,
		"ref", rep.RefPages, "data", rep.DataPages, "fallback", rep.FallbackPages,
		"compressedRecords", rep.CompressedRecords, "payloadBytes", rep.PayloadBytes, "payloadSentBytes", rep.PayloadSentBytes,
		"remoteExit", st.ExitStatus)
	if err != nil {
		rep.Error = err.Error()
		return err
	}
	rep.OK = st.ExitStatus == 0
	if st.ExitStatus != 0 {
		return fmt.Errorf("xl on %s exited with status %d (see its messages above)", host, st.ExitStatus)
	}
	return nil
}

// catalogIndex adapts a dedup.Catalog to xlstream.PageIndex.
type catalogIndex struct{ c *dedup.Catalog }

func (ci catalogIndex) Lookup(page []byte) (xlstream.Ref, bool) {
	class, _, r := ci.c.Classify(page)
	if class != dedup.ClassDisk || r.Disk > 255 {
		return xlstream.Ref{}, false
	}
	return xlstream.Ref{Disk: uint8(r.Disk), Offset: uint64(r.Offset), Hash: r.Hash}, true
}

// XLRecv is `node-agent xl-recv`: it accepts xl-send connections and runs
// `xl migrate-receive` on the rebuilt stream.
func XLRecv(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("xl-recv", flag.ContinueOnError)
	listen := fs.String("listen", fmt.Sprintf(":%d", defaultXLPort), "address to listen on (default with --insecure-allow-anonymous: 127.0.0.1 only)")
	xlPath := fs.String("xl", "xl", "the xl command")
	once := fs.Bool("once", false, "serve one migration, then exit")
	verbose := fs.Int("v", 0, "log verbosity")
	maxConns := fs.Int("max-conns", 2, "connections served at once; more are closed at once")
	handshake := fs.Duration("handshake-timeout", 10*time.Second, "time a peer has for the TLS handshake and its request")
	spoolDir := fs.String("spool-dir", defaultSpoolDir, "early resume: where a source's spool is read if the source dies after the go (storage shared with the sources)")
	lazyReport := fs.String("lazy-report", "", "early resume: write each migration's figures (JSON) to this file")
	var tf tlsFlags
	tf.bind(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := stderrLogger(*verbose).WithName("xl-recv")
	if *maxConns < 1 || *handshake <= 0 {
		return errors.New("--max-conns must be at least 1 and --handshake-timeout positive")
	}
	addr := listenDefault(fs, *listen, tf.insecure, defaultXLPort)
	src, err := tf.source(log, addr)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	defer ln.Close()
	log.Info("Listening", "addr", ln.Addr().String(), "mTLS", src != nil, "maxConns", *maxConns)
	srv := &xlRecvServer{src: src, maxConns: *maxConns, handshakeTimeout: *handshake, log: log,
		handle: func(ctx context.Context, c net.Conn, l logr.Logger) error {
			lz := xlRecvLazy{spoolDir: *spoolDir}
			if *lazyReport != "" {
				lz.report = func(st lazyStats) {
					b, _ := json.Marshal(st)
					_ = os.WriteFile(*lazyReport, append(b, '\n'), 0o644)
				}
			}
			_, err := receiveXL(ctx, c, *xlPath, l, nil, lz)
			return err
		}}
	return srv.serve(ctx, ln, *once)
}

// xlRecvServer accepts xl-send connections: at most maxConns at once (one
// over is closed at once, before any work), each with handshakeTimeout to
// complete the TLS handshake and send its request. Every xl-recv
// connection may start a root `xl migrate-receive`; the bound is what a
// stranger could otherwise multiply.
type xlRecvServer struct {
	// src is nil in anonymous mode.
	src              pki.Source
	maxConns         int
	handshakeTimeout time.Duration
	log              logr.Logger
	// handle serves an admitted connection; its deadline still bounds the
	// request, which handle reads and then clears the deadline.
	handle func(ctx context.Context, c net.Conn, log logr.Logger) error
}

func (s *xlRecvServer) serve(ctx context.Context, ln net.Listener, once bool) error {
	go func() { <-ctx.Done(); ln.Close() }()
	sem := make(chan struct{}, s.maxConns)
	var wg sync.WaitGroup
	defer wg.Wait()
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
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		select {
		case sem <- struct{}{}:
		default:
			s.log.Info("Refused a connection: too many at once", "peer", c.RemoteAddr().String(), "maxConns", s.maxConns)
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			defer c.Close()
			s.serveConn(ctx, c)
		}()
		if once {
			wg.Wait()
			return nil
		}
	}
}

func (s *xlRecvServer) serveConn(ctx context.Context, c net.Conn) {
	l := s.log.WithValues("peer", c.RemoteAddr().String())
	_ = c.SetDeadline(time.Now().Add(s.handshakeTimeout))
	if s.src != nil {
		tc, host, err := acceptTLS(ctx, c, s.src, s.handshakeTimeout)
		if err != nil {
			l.Info("Refused a connection", "reason", err.Error())
			return
		}
		defer tc.Close()
		c, l = tc, l.WithValues("peerHost", host)
	}
	if err := s.handle(ctx, c, l); err != nil {
		l.Error(err, "Migration receive failed")
	}
}

// checkRemoteArgv allows only `xl migrate-receive [options]`: the peer
// chooses the arguments, so nothing else may run.
func checkRemoteArgv(argv []string) error {
	if len(argv) < 2 || argv[0] != "xl" {
		return fmt.Errorf("refusing to run %q: only `xl migrate-receive [options]` is allowed", strings.Join(argv, " "))
	}
	seen := false
	for _, a := range argv[1:] {
		switch {
		case a == "migrate-receive":
			seen = true
		case strings.HasPrefix(a, "-") && !strings.ContainsAny(a, "=/ \t\n"):
		default:
			return fmt.Errorf("refusing to run %q: argument %q is not an option of xl migrate-receive", strings.Join(argv, " "), a)
		}
	}
	if !seen {
		return fmt.Errorf("refusing to run %q: not an xl migrate-receive", strings.Join(argv, " "))
	}
	return nil
}

func serveXLRecv(ctx context.Context, c net.Conn, xlPath string, log logr.Logger) error {
	_, err := receiveXL(ctx, c, xlPath, log, nil, xlRecvLazy{spoolDir: defaultSpoolDir})
	return err
}

// xlRecvLazy configures early resume on the receiving side: it is taken
// when the source asks for it and this host can page (paging.Probe); the
// spool directory is where the source's spool is found if the source dies
// after the go (storage both hosts share).
type xlRecvLazy struct {
	spoolDir string
	// report, when set, gets the early resume's figures.
	report func(lazyStats)
	// resumed, when set, is told when the domain runs here while its held
	// pages still come.
	resumed func()
}

const defaultSpoolDir = "/var/lib/xenferry/spool"

// receiveXL serves one xl-send connection: the request, then xl
// migrate-receive fed with the rebuilt stream. check, when set, vets xl's
// header (the domain's configuration) before xl reads a byte. It returns
// xl migrate-receive's exit status (-1 if it did not end by itself).
func receiveXL(ctx context.Context, c net.Conn, xlPath string, log logr.Logger, check func(*xlstream.XLHeader) error, lz xlRecvLazy) (int, error) {
	argv, err := xlstream.ReadHello(c)
	if err != nil {
		return -1, err
	}
	if err := checkRemoteArgv(argv); err != nil {
		return -1, err
	}
	// The request is in: the pre-authentication deadline ends here.
	_ = c.SetDeadline(time.Time{})
	start := time.Now()
	cmd := exec.CommandContext(ctx, xlPath, argv[1:]...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return -1, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return -1, err
	}
	if err := cmd.Start(); err != nil {
		return -1, fmt.Errorf("start %s: %w", strings.Join(argv, " "), err)
	}
	log.Info("Started", "cmd", strings.Join(argv, " "), "pid", cmd.Process.Pid)
	res := &lazyResolver{ctx: ctx, log: log}
	tee := &prefixTee{w: stdin, max: 1 << 20, check: check}
	res.header = tee
	sink := newXLLazySink(ctx, log, xlPath, lz.spoolDir, func() (string, error) {
		h, err := parseXLHeader(tee.prefix())
		if err != nil {
			return "", err
		}
		return h.Name()
	})
	var out io.Reader = &readyGate{r: stdout, gate: func() error {
		if !sink.active() {
			return nil
		}
		return sink.beforeReady()
	}}
	defer sink.release()
	status := -1
	st, err := xlstream.Receive(ctx, c, tee, out, res, xlstream.ReceiveOptions{
		Lazy: sink, Resumed: lz.resumed,
		Wait: func() int {
			werr := cmd.Wait()
			status = cmd.ProcessState.ExitCode()
			if werr != nil {
				log.Info("xl migrate-receive ended", "status", status, "err", werr.Error())
			}
			return status
		},
		ProgressEvery: 10 * time.Second,
		Progress: func(s xlstream.DecodeStats) {
			log.Info("Receiving", "linkMiB", s.InBytes>>20, "streamMiB", s.OutBytes>>20, "ref", s.RefPages, "stale", s.StalePages)
		},
	})
	res.close()
	if status == -1 {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if sink.active() {
			// Killed with the domain restored: it never ran here (the
			// go never came), so it goes, and the source keeps it.
			if name, nerr := sink.domName(); nerr == nil {
				_ = exec.Command(xlPath, "destroy", name+"--incoming").Run()
			}
		}
	}
	if sink.active() && lz.report != nil {
		lz.report(sink.stats())
	}
	log.Info("Migration received", "seconds", time.Since(start).Seconds(), "linkBytes", st.InBytes, "streamBytes", st.OutBytes,
		"zero", st.ZeroPages, "ref", st.RefPages, "data", st.DataPages, "stale", st.StalePages, "xlStatus", status)
	if err != nil {
		return status, err
	}
	if status != 0 {
		return status, fmt.Errorf("xl migrate-receive exited with status %d", status)
	}
	return status, nil
}

// pacedConn paces what is written to the link; reads and Close pass.
type pacedConn struct {
	net.Conn
	ctx context.Context
	b   *pace.Bucket
}

func (p pacedConn) Write(b []byte) (int, error) {
	if err := p.b.Wait(p.ctx, len(b)); err != nil {
		return 0, err
	}
	return p.Conn.Write(b)
}

// prefixTee passes writes through and keeps the first max bytes, where
// xl's header (and with it the domain's disk list) is. With check set,
// nothing reaches xl before the header has been read and check accepted
// it: the configuration in it names what xl migrate-receive will attach.
type prefixTee struct {
	w   io.WriteCloser
	mu  sync.Mutex
	buf []byte
	max int
	// check, when set, vets xl's header before any byte is passed on.
	check   func(*xlstream.XLHeader) error
	checked bool
	pending []byte // written before the check, at most about max bytes
}

func (t *prefixTee) Write(p []byte) (int, error) {
	t.mu.Lock()
	if room := t.max - len(t.buf); room > 0 {
		t.buf = append(t.buf, p[:min(room, len(p))]...)
	}
	if t.check == nil || t.checked {
		t.mu.Unlock()
		return t.w.Write(p)
	}
	t.pending = append(t.pending, p...)
	h, err := parseXLHeader(t.pending)
	if err == nil && h == nil {
		if len(t.pending) < t.max {
			t.mu.Unlock()
			return len(p), nil // held back until the header is whole
		}
		err = fmt.Errorf("no xl header in the first %d bytes: %w", t.max, xlstream.ErrBadHeader)
	}
	if err == nil {
		err = t.check(h)
	}
	if err != nil {
		t.mu.Unlock()
		return 0, fmt.Errorf("refused the incoming domain: %w", err)
	}
	held := t.pending
	t.checked, t.pending = true, nil
	t.mu.Unlock()
	if _, err := t.w.Write(held); err != nil {
		return 0, err
	}
	return len(p), nil
}

// parseXLHeader reads xl's header from the start of a stream: nil, nil
// while more bytes are needed.
func parseXLHeader(b []byte) (*xlstream.XLHeader, error) {
	rd := xlstream.NewReader(bytes.NewReader(b))
	for rd.XL() == nil {
		if _, err := rd.Next(); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, xlstream.ErrTruncated) {
				return nil, nil
			}
			return nil, fmt.Errorf("parse xl header: %w", err)
		}
	}
	return rd.XL(), nil
}

func (t *prefixTee) Close() error { return t.w.Close() }

func (t *prefixTee) prefix() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf
}

// lazyResolver opens the domain's disks on the first reference, from the
// disk list in xl's header (already rebuilt by then).
type lazyResolver struct {
	ctx    context.Context
	log    logr.Logger
	header *prefixTee
	once   sync.Once
	r      *dedup.Resolver
	err    error
}

func (l *lazyResolver) open() {
	rd := xlstream.NewReader(strings.NewReader(string(l.header.prefix())))
	if _, err := rd.Next(); err != nil && !errors.Is(err, io.EOF) {
		l.err = fmt.Errorf("parse xl header for the disk list: %w", err)
		return
	}
	h := rd.XL()
	if h == nil {
		l.err = fmt.Errorf("no xl header before the first disk reference (%d bytes seen): %w", len(l.header.prefix()), xlstream.ErrBadHeader)
		return
	}
	disks, err := h.Disks()
	if err != nil {
		l.err = err
		return
	}
	paths := make([]string, len(disks))
	for i, d := range disks {
		paths[i] = d.PdevPath
	}
	l.r = dedup.OpenResolver(paths, 2)
	for i, e := range l.r.Unavailable() {
		// Unavailable has one entry per disk, nil for a disk that opened.
		if e != nil {
			l.log.Info("Shared disk unavailable here; its pages come from the source", "disk", paths[i], "reason", e.Error())
		}
	}
	l.log.Info("Opened shared disks", "disks", paths)
}

func (l *lazyResolver) ReadPage(ref xlstream.Ref, dst []byte) error {
	l.once.Do(l.open)
	if l.err != nil {
		return l.err
	}
	var ferr error
	err := l.r.ResolveBatch(l.ctx, []dedup.Ref{{Disk: uint32(ref.Disk), Offset: int64(ref.Offset), Hash: ref.Hash}},
		func(int) []byte { return dst }, func(_ int, e error) { ferr = e })
	if err != nil {
		return err
	}
	return ferr
}

func (l *lazyResolver) close() {
	if l.r != nil {
		l.r.Close()
	}
}

// XLIndex is `node-agent xl-index`: it builds (or loads) the persisted
// dedup index of each disk given, where xl-send and run find it.
func XLIndex(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("xl-index", flag.ContinueOnError)
	stateDir := fs.String("state-dir", "/var/lib/xenferry", "where dedup indexes persist")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return fmt.Errorf("usage: xl-index [--state-dir DIR] DISK...")
	}
	log := stderrLogger(0).WithName("xl-index")
	for _, p := range fs.Args() {
		t0 := time.Now()
		// The agent's cache, one disk at a time: each index is persisted
		// and its memory freed before the next.
		indexes := newDiskIndexes(*stateDir, log)
		ix, err := indexes.get(ctx, p, func(done, total int64) {})
		if err != nil {
			return err
		}
		fmt.Printf("{\"disk\":%q,\"entries\":%d,\"blocks\":%d,\"seconds\":%.1f}\n", p, ix.Entries(), ix.Blocks(), time.Since(t0).Seconds())
		indexes.close()
	}
	return nil
}
