package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

func stderrLogger(v int) logr.Logger {
	return funcr.New(func(prefix, args string) {
		if prefix != "" {
			fmt.Fprintln(os.Stderr, prefix, args)
		} else {
			fmt.Fprintln(os.Stderr, args)
		}
	}, funcr.Options{Verbosity: v, LogTimestamp: true})
}

func defaultControl(stateDir string) string { return filepath.Join(stateDir, "agent.sock") }

// Serve is a standalone agent: it receives migrations on the data port
// and takes local requests (list, migrate) on a unix control socket.
func Serve(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	backend := fs.String("backend", "sim", "hypervisor backend: sim or xen")
	simConfig := fs.String("sim-config", "", "sim backend: host definition (YAML)")
	listen := fs.String("listen", ":7070", "migration data port")
	stateDir := fs.String("state-dir", filepath.Join(os.TempDir(), "xenferry-agent"), "agent state: disk indexes, control socket")
	control := fs.String("control", "", "control socket (default STATE-DIR/agent.sock)")
	durableDir := fs.String("durable-dir", "auto", "shared directory (same path on every host) for durable post-copy mirrors; "+
		"\"auto\": on the backend's shared storage when it knows one (sim: STATEDIR/xenferry-durable; xen: none), \"\": off")
	verbose := fs.Int("v", 0, "log verbosity")
	var tf tlsFlags
	tf.bind(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := stderrLogger(*verbose)
	*listen = listenDefault(fs, *listen, tf.insecure, 7070)
	tlsSrc, err := tf.source(log, "the data port "+*listen)
	if err != nil {
		return err
	}
	if *control == "" {
		*control = defaultControl(*stateDir)
	}
	if err := os.MkdirAll(*stateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	host, err := OpenBackend(*backend, *simConfig, *stateDir, log)
	if err != nil {
		return err
	}
	defer host.Close()
	if *durableDir == "auto" {
		*durableDir = DefaultDurableDir(host)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on the data port %s: %w", *listen, err)
	}
	if tlsSrc != nil {
		// Any peer with a certificate of --tls-ca is served; the receiver
		// bounds the handshake with its handshake deadline.
		ln = pki.Listener(ln, tlsSrc)
	}
	_ = os.Remove(*control)
	cl, err := net.Listen("unix", *control)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", *control, err)
	}
	defer os.Remove(*control)
	ix := newDiskIndexes(*stateDir, log.WithName("dedup"))
	defer ix.close()
	rcv := &engine.Receiver{Host: host, Log: log.WithName("receiver"), DurableDir: *durableDir, Events: func(id string, ev engine.Event) {
		log.Info("Incoming migration", "migration", id, "domain", ev.Domain, "event", string(ev.Kind), "error", errString(ev.Err))
	}}
	srv := &http.Server{Handler: controlMux(host, ix, *durableDir, log, tlsSrc)}
	go func() { <-ctx.Done(); srv.Close() }()
	go func() { _ = srv.Serve(cl) }()
	info, _ := host.Info(ctx)
	log.Info("Agent serving", "host", info.Name, "backend", info.Backend, "data", ln.Addr().String(), "control", *control)
	return rcv.Serve(ctx, ln)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// migrateRequest is the body of POST /migrate on the control socket.
type migrateRequest struct {
	Domain string `json:"domain"`
	To     string `json:"to"`
	// ToHost is the name the destination's certificate must carry
	// (default: the host part of To).
	ToHost   string `json:"toHost,omitempty"`
	Strategy string `json:"strategy"`
	Link     int64  `json:"linkBytesPerSec"`
	Streams  int    `json:"streams"`
	Compress bool   `json:"compress"`
}

// migrateEvent is one NDJSON line of the /migrate answer.
type migrateEvent struct {
	Progress *engine.Progress `json:"progress,omitempty"`
	Indexing *struct {
		Path        string `json:"path"`
		Done, Total int64
	} `json:"indexing,omitempty"`
	Result *engine.Result `json:"result,omitempty"`
	Error  string         `json:"error,omitempty"`
}

// resolveRequest is the body of POST /resolve on the control socket.
type resolveRequest struct {
	Domain  string `json:"domain"`
	Verdict string `json:"verdict"` // "reclaim" or "release"
}

func controlMux(host xenmem.Host, ix *diskIndexes, durableDir string, log logr.Logger, tlsSrc pki.Source) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /domains", func(w http.ResponseWriter, r *http.Request) {
		ds, err := host.Domains(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_ = json.NewEncoder(w).Encode(ds)
	})
	mux.HandleFunc("POST /migrate", func(w http.ResponseWriter, r *http.Request) {
		var req migrateRequest
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		enc := json.NewEncoder(w)
		flusher, _ := w.(http.Flusher)
		emit := func(ev migrateEvent) {
			_ = enc.Encode(ev)
			if flusher != nil {
				flusher.Flush()
			}
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		if req.ToHost == "" {
			req.ToHost = serverNameOf(req.To)
		}
		res, err := migrateLocal(r.Context(), host, ix, req, durableDir, emit, log, dialFor(tlsSrc, req.ToHost))
		if err != nil {
			emit(migrateEvent{Error: err.Error()})
			return
		}
		emit(migrateEvent{Result: &res})
	})
	mux.HandleFunc("POST /resolve", func(w http.ResponseWriter, r *http.Request) {
		var req resolveRequest
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := resolveLocal(r.Context(), host, req, log); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		_, _ = fmt.Fprintf(w, "%s: %s done\n", req.Domain, req.Verdict)
	})
	return mux
}

// resolveLocal applies an operator's verdict to a domain a migration left
// paused after go: reclaim resumes it here (the destination does not and
// never will run it), release destroys it (the destination runs it with
// verified memory). The operator checks the destination first; nothing
// here can.
func resolveLocal(ctx context.Context, host xenmem.Host, req resolveRequest, log logr.Logger) error {
	if req.Verdict != "reclaim" && req.Verdict != "release" {
		return fmt.Errorf("verdict %q: want reclaim or release", req.Verdict)
	}
	dom, err := host.OpenSource(ctx, req.Domain)
	if err != nil {
		return fmt.Errorf("open domain %q: %w", req.Domain, err)
	}
	defer dom.Close()
	if req.Verdict == "release" {
		if err := dom.Release(); err != nil {
			return fmt.Errorf("release %q: %w", req.Domain, err)
		}
		log.Info("Released a domain on the operator's verdict", "domain", req.Domain)
		return nil
	}
	if err := dom.Reclaim("operator's verdict (node-agent resolve --reclaim)"); err != nil {
		return fmt.Errorf("reclaim %q: %w", req.Domain, err)
	}
	log.Info("Reclaimed a domain on the operator's verdict", "domain", req.Domain)
	return nil
}

// migrateLocal runs one outgoing migration. The handle's Close never
// resumes a domain the engine committed (go sent): after a failure past
// that point the domain stays paused here for `node-agent resolve`.
func migrateLocal(ctx context.Context, host xenmem.Host, ix *diskIndexes, req migrateRequest, durableDir string, emit func(migrateEvent), log logr.Logger, dial func(context.Context, string) (net.Conn, error)) (engine.Result, error) {
	st := engine.Strategy(req.Strategy)
	if !st.Valid() {
		return engine.Result{}, fmt.Errorf("unknown strategy %q (want one of %v)", req.Strategy, engine.Strategies)
	}
	dom, err := host.OpenSource(ctx, req.Domain)
	if err != nil {
		return engine.Result{}, fmt.Errorf("open domain %q: %w", req.Domain, err)
	}
	defer dom.Close()
	hooks := engine.Hooks{Log: log.WithName("source"), Progress: func(p engine.Progress) { emit(migrateEvent{Progress: &p}) }}
	if strings.HasSuffix(req.Strategy, "+dedup") {
		last := time.Time{}
		cat, err := ix.catalog(ctx, dom.Info().Disks, func(path string) func(done, total int64) {
			return func(done, total int64) {
				if time.Since(last) > 500*time.Millisecond || done == total {
					last = time.Now()
					emit(migrateEvent{Indexing: &struct {
						Path        string `json:"path"`
						Done, Total int64
					}{path, done, total}})
				}
			}
		})
		if err != nil {
			return engine.Result{}, err
		}
		hooks.Disks = cat
	}
	id := fmt.Sprintf("%s-%d", req.Domain, time.Now().UnixNano())
	opts := engine.Options{Strategy: st, LinkBytesPerSec: req.Link, Streams: req.Streams, Compress: req.Compress, MigrationID: id, DurableDir: durableDir, Dial: dial}
	res, err := engine.Migrate(ctx, dom, req.To, opts, hooks)
	if errors.Is(err, engine.ErrCommittedFailure) {
		err = fmt.Errorf("%w (once you have checked the destination: `node-agent resolve --domain %s --release` or `--reclaim`)", err, req.Domain)
	}
	return res, err
}

// Resolve sends an operator's verdict on a paused, committed domain to
// the local agent.
func Resolve(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("resolve", flag.ContinueOnError)
	domain := fs.String("domain", "", "domain a failed migration left paused after go (required)")
	reclaim := fs.Bool("reclaim", false, "resume it here: the destination does not and never will run it")
	release := fs.Bool("release", false, "destroy it here: the destination runs it with verified memory")
	stateDir := fs.String("state-dir", filepath.Join(os.TempDir(), "xenferry-agent"), "the local agent's state dir")
	control := fs.String("control", "", "the local agent's control socket (default STATE-DIR/agent.sock)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *domain == "" || *reclaim == *release {
		return errors.New("--domain and exactly one of --reclaim or --release are required")
	}
	if *control == "" {
		*control = defaultControl(*stateDir)
	}
	verdict := "release"
	if *reclaim {
		verdict = "reclaim"
	}
	body, _ := json.Marshal(resolveRequest{Domain: *domain, Verdict: verdict})
	cli := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", *control)
	}}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/resolve", strings.NewReader(string(body)))
	resp, err := cli.Do(req)
	if err != nil {
		return fmt.Errorf("reach the local agent at %s (is `node-agent serve` running?): %w", *control, err)
	}
	defer resp.Body.Close()
	msg, _ := bufio.NewReader(resp.Body).ReadString('\n')
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent refused: %s", strings.TrimSpace(msg))
	}
	fmt.Print(msg)
	return nil
}

// Migrate asks the local agent to migrate one of its domains and shows
// its progress.
func Migrate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	domain := fs.String("domain", "", "domain to migrate (required)")
	to := fs.String("to", "", "destination agent's data address HOST:PORT (required)")
	toHost := fs.String("to-host", "", "name the destination's certificate must carry (default: HOST of --to)")
	stateDir := fs.String("state-dir", filepath.Join(os.TempDir(), "xenferry-agent"), "the local agent's state dir")
	control := fs.String("control", "", "the local agent's control socket (default STATE-DIR/agent.sock)")
	strategy := fs.String("strategy", string(engine.StrategyHybridDedup), "strategy: xen, precopy, precopy+dedup, postcopy, hybrid, hybrid+dedup")
	link := fs.Int64("link", 0, "bandwidth cap in bytes/s (0 = none)")
	streams := fs.Int("streams", engine.DefaultStreams, "parallel data connections")
	compress := fs.Bool("compress", false, "zstd for full pages")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *domain == "" || *to == "" {
		return errors.New("--domain and --to are required")
	}
	if *control == "" {
		*control = defaultControl(*stateDir)
	}
	body, _ := json.Marshal(migrateRequest{Domain: *domain, To: *to, ToHost: *toHost, Strategy: *strategy, Link: *link, Streams: *streams, Compress: *compress})
	cli := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", *control)
	}}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/migrate", strings.NewReader(string(body)))
	resp, err := cli.Do(req)
	if err != nil {
		return fmt.Errorf("reach the local agent at %s (is `node-agent serve` running?): %w", *control, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := bufio.NewReader(resp.Body).ReadString('\n')
		return fmt.Errorf("agent refused: %s", strings.TrimSpace(b))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	tty := isTerminal(os.Stderr)
	for sc.Scan() {
		var ev migrateEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("agent answer: %w", err)
		}
		switch {
		case ev.Error != "":
			if tty {
				fmt.Fprintln(os.Stderr)
			}
			return errors.New(ev.Error)
		case ev.Indexing != nil:
			fmt.Fprintf(os.Stderr, "indexing %s: %d/%d MiB\n", ev.Indexing.Path, ev.Indexing.Done>>20, ev.Indexing.Total>>20)
		case ev.Progress != nil:
			printProgress(*domain, *ev.Progress, tty)
		case ev.Result != nil:
			if tty {
				fmt.Fprintln(os.Stderr)
			}
			return printResult(*ev.Result, *asJSON)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("agent connection: %w", err)
	}
	return errors.New("the agent closed the connection before the migration ended")
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// printProgress draws a bar on a terminal, plain lines elsewhere.
func printProgress(dom string, p engine.Progress, tty bool) {
	const width = 30
	n := int(p.Percent / 100 * width)
	bar := strings.Repeat("#", n) + strings.Repeat(".", width-n)
	line := fmt.Sprintf("%s [%s] %5.1f%% %-11s round %d  %6.1f MiB/s  sent %d MiB  zero %d disk %d full %d",
		dom, bar, p.Percent, p.Phase, p.Round, p.WireBytesPerSec/(1<<20), p.WireBytes>>20, p.Pages.Zero, p.Pages.Disk, p.Pages.Full)
	if tty {
		fmt.Fprintf(os.Stderr, "\r%s", line)
	} else {
		fmt.Fprintln(os.Stderr, line)
	}
}

func printResult(r engine.Result, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(os.Stdout).Encode(r)
	}
	fmt.Printf("migrated %d MiB with %s in %.2fs (resumed after %.2fs, downtime %d ms), %.1f MiB on the wire, verified=%v\n",
		r.MemoryBytes>>20, r.Strategy, r.Total.Seconds(), r.Resume.Seconds(), r.Downtime.Milliseconds(), float64(r.WireBytes)/(1<<20), r.Verified)
	fmt.Printf("pages: %d zero, %d from disk (%d fell back), %d full, %d resent, %d on demand; stop: %s\n",
		r.Pages.Zero, r.Pages.Disk, r.Pages.DiskFallback, r.Pages.Full, r.Pages.Resent, r.Pages.Demand, r.StopReason)
	return nil
}
