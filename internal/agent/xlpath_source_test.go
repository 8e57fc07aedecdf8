package agent

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/internal/testlog"
	"github.com/xenferry/xenferry/internal/xlpath"
)

// The source side of the xl path against a stand-in xl on both hosts:
// xl migrate runs node-agent xl-send (agent mode: auth frame, progress
// file, commit before the permission to go) to an mTLS xl receiver that
// checks the token and runs xl migrate-receive. Each case ends with the
// domain on exactly one host, as xl's own failure handling and the
// outcome the agent acts on say.
func TestXLSourceOutcomes(t *testing.T) {
	pkiDir := t.TempDir()
	labPKI(t, pkiDir, "host-a", "host-b")
	token := []byte("0123456789abcdef0123456789abcdef")
	cases := []struct {
		name      string
		recvEnv   []string
		token     []byte
		abort     bool
		want      xlpath.Outcome
		committed bool
		onA, onB  map[string]string
	}{
		{name: "success", want: xlpath.Migrated, committed: true,
			onA: map[string]string{}, onB: map[string]string{"vm": "running"}},
		{name: "the target fails the restore before ready", recvEnv: []string{"FAKE_XL_FAIL=before-ready"}, want: xlpath.ResumedHere,
			onA: map[string]string{"vm": "running"}, onB: map[string]string{}},
		{name: "a wrong token is refused before anything runs", token: []byte("not-the-token-not-the-token-1234"), want: xlpath.ResumedHere,
			onA: map[string]string{"vm": "running"}, onB: map[string]string{}},
		{name: "an abort before go resumes at the source", recvEnv: []string{"FAKE_XL_SLOW=3s"}, abort: true, want: xlpath.ResumedHere,
			onA: map[string]string{"vm": "running"}, onB: map[string]string{}},
		{name: "no report after go leaves it undecided, running only at the target", recvEnv: []string{"FAKE_XL_FAIL=no-report"}, want: xlpath.Undecided, committed: true,
			onA: map[string]string{"vm--migratedaway": "suspended"}, onB: map[string]string{"vm": "running"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := newFakeXLHost(t)
			b := newFakeXLHost(t, append([]string{"FAKE_XL_DOMAIN=vm"}, c.recvEnv...)...)
			if err := os.WriteFile(filepath.Join(a.dir, "vm"), []byte("running\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			srv := &xlRecvServer{src: labSource(t, pkiDir, "host-b"), maxConns: 2, handshakeTimeout: 5 * time.Second, log: testlog.New(t),
				handle: func(ctx context.Context, conn net.Conn, l logr.Logger) error {
					au, err := xlpath.ReadAuth(conn)
					if err != nil {
						return err
					}
					if au.Migration != "m-1" || subtle.ConstantTimeCompare(au.Token, token) != 1 {
						return fmt.Errorf("migration %q: wrong token", au.Migration)
					}
					return serveXLRecv(ctx, conn, b.xl, l)
				}}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- srv.serve(ctx, ln, false) }()
			defer func() { cancel(); <-served }()

			work := t.TempDir()
			tok := c.token
			if tok == nil {
				tok = token
			}
			authFile, progFile := filepath.Join(work, "auth.json"), filepath.Join(work, "progress.json")
			ab, _ := json.Marshal(xlpath.Auth{Migration: "m-1", Token: tok})
			if err := os.WriteFile(authFile, ab, 0o600); err != nil {
				t.Fatal(err)
			}
			_, port, _ := net.SplitHostPort(ln.Addr().String())
			transport := strings.Join([]string{a.agent, "xl-send", "--no-dedup", "--port", port, "--server-name", "host-b",
				"--tls-cert", filepath.Join(pkiDir, "host-a.crt"), "--tls-key", filepath.Join(pkiDir, "host-a.key"), "--tls-ca", filepath.Join(pkiDir, "ca.crt")}, " ")
			var samples []xlpath.Progress
			m := xlpath.Migration{XL: a.xl, Domain: "vm", Host: "127.0.0.1", Transport: transport,
				Env:          []string{xlAuthFileEnv + "=" + authFile, xlProgressFileEnv + "=" + progFile},
				ProgressFile: progFile, PollEvery: 50 * time.Millisecond, Log: testlog.New(t),
				Progress: func(p xlpath.Progress) { samples = append(samples, p) }}
			if c.abort {
				go func() {
					deadline := time.Now().Add(10 * time.Second)
					for time.Now().Before(deadline) {
						// The target restores slowly (FAKE_XL_SLOW): the
						// stream has gone into the buffers and the source
						// waits for "ready" when the abort comes.
						if p, _ := xlpath.ReadProgress(progFile); p.PID > 0 {
							time.Sleep(500 * time.Millisecond)
							if ok, err := xlpath.Abort(progFile); !ok || err != nil {
								t.Errorf("Abort during the stream: asked=%v err=%v", ok, err)
							}
							return
						}
						time.Sleep(20 * time.Millisecond)
					}
					t.Errorf("the stream never started")
				}()
			}
			res, err := m.Run(context.Background())
			t.Logf("outcome %s exit %d after %.1fs, err %v; last progress %+v", res.Outcome, res.Exit, res.Seconds, err, res.Last)
			if res.Outcome != c.want {
				t.Fatalf("outcome %s, want %s; xl said:\n%s", res.Outcome, c.want, res.Messages)
			}
			if (err == nil) != (c.want == xlpath.Migrated) {
				t.Fatalf("err %v with outcome %s", err, res.Outcome)
			}
			if res.Last.Committed != c.committed {
				t.Fatalf("progress committed=%v, want %v", res.Last.Committed, c.committed)
			}
			if c.want == xlpath.Migrated && (res.Last.LinkBytes == 0 || res.Last.StreamBytes == 0 || len(samples) == 0) {
				t.Fatalf("no progress reported: last %+v, %d samples", res.Last, len(samples))
			}
			if got := a.state(t); fmt.Sprint(got) != fmt.Sprint(c.onA) {
				t.Errorf("source host has %v, want %v", got, c.onA)
			}
			if got := b.state(t); fmt.Sprint(got) != fmt.Sprint(c.onB) {
				t.Errorf("target host has %v, want %v", got, c.onB)
			}
		})
	}
}
