package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/pkg/pki"
)

// labPKI makes a lab CA in dir with `node-agent pki` and issues hosts.
func labPKI(t *testing.T, dir string, hosts ...string) {
	t.Helper()
	ctx := context.Background()
	if err := PKI(ctx, []string{"ca", "--dir", dir}); err != nil {
		t.Fatal(err)
	}
	if err := PKI(ctx, []string{"ca", "--dir", dir}); err == nil {
		t.Fatal("pki ca replaced an existing CA")
	}
	for _, h := range hosts {
		if err := PKI(ctx, []string{"issue", "--dir", dir, "--name", h, "--ip", "127.0.0.1"}); err != nil {
			t.Fatal(err)
		}
	}
}

func labSource(t *testing.T, dir, host string) pki.Source {
	t.Helper()
	src, err := pki.LoadFiles(filepath.Join(dir, host+".crt"), filepath.Join(dir, host+".key"), filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// xl-recv serves only mTLS peers of its CA, gives each the handshake
// timeout to authenticate, and serves a bounded number at once.
func TestXLRecvRequiresMutualTLS(t *testing.T) {
	dir, evilDir := t.TempDir(), t.TempDir()
	labPKI(t, dir, "host-a", "host-b")
	labPKI(t, evilDir, "host-a")

	type admitted struct{ peer string }
	got := make(chan admitted, 8)
	release := make(chan struct{})
	srv := &xlRecvServer{
		src: labSource(t, dir, "host-b"), maxConns: 1, handshakeTimeout: 700 * time.Millisecond,
		log: testlog.New(t),
		handle: func(ctx context.Context, c net.Conn, l logr.Logger) error {
			got <- admitted{peer: peerOf(c)}
			select {
			case <-release:
			case <-ctx.Done():
			}
			return nil
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.serve(ctx, ln, false) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	addr := ln.Addr().String()
	refused := func(t *testing.T, c net.Conn) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadAll(c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the connection stayed open")
		}
		select {
		case a := <-got:
			t.Fatalf("a refused peer reached the xl side (peer %q)", a.peer)
		default:
		}
	}

	t.Run("a plaintext peer is refused", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = c.Write([]byte("xl migrate-receive\x00\x00"))
		refused(t, c)
	})
	t.Run("a silent peer is cut off at the handshake timeout", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		refused(t, c)
		if took := time.Since(start); took > 3*time.Second {
			t.Fatalf("a silent peer held a slot for %s", took)
		}
	})
	t.Run("a certificate of another CA is refused", func(t *testing.T) {
		// Trusts the real CA (so it accepts host-b) but presents evil's host-a.
		evil, err := pki.LoadFiles(filepath.Join(evilDir, "host-a.crt"), filepath.Join(evilDir, "host-a.key"), filepath.Join(dir, "ca.crt"))
		if err != nil {
			t.Fatal(err)
		}
		if err := probe(dialFor(evil, "host-b"), addr); err == nil {
			t.Fatal("xl-recv accepted a certificate of another CA")
		}
		select {
		case a := <-got:
			t.Fatalf("a refused peer reached the xl side (peer %q)", a.peer)
		case <-time.After(200 * time.Millisecond):
		}
	})
	t.Run("xl-send refuses a receiver that is not the host it names", func(t *testing.T) {
		if err := probe(dialFor(labSource(t, dir, "host-a"), "host-c"), addr); err == nil {
			t.Fatal("the sender accepted host-b's certificate as host-c")
		}
	})
	t.Run("an agent of the CA is served, and one connection over the limit is closed at once", func(t *testing.T) {
		ctx, cancelDial := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancelDial()
		// The refused peers above may still hold the only slot for a moment.
		var c net.Conn
		var err error
		for range 20 {
			if c, err = dialFor(labSource(t, dir, "host-a"), "host-b")(ctx, addr); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		select {
		case a := <-got:
			if a.peer != "host-a" {
				t.Fatalf("peer host %q, want host-a", a.peer)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a valid peer was not served")
		}
		// The only slot is taken: the next connection is closed before any
		// handshake (well before the handshake timeout).
		c2, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close()
		start := time.Now()
		refused(t, c2)
		if took := time.Since(start); took > 500*time.Millisecond {
			t.Fatalf("the connection over the limit lingered %s", took)
		}
		close(release)
	})
}

// peerOf is the verified host of a TLS connection ("" otherwise).
func peerOf(c net.Conn) string {
	if tc, ok := c.(*tls.Conn); ok {
		return pki.PeerHost(tc.ConnectionState())
	}
	return ""
}

// Anonymous mode is refused unless asked for by name.
func TestStandaloneCommandsRefuseAnonymousByDefault(t *testing.T) {
	ctx := context.Background()
	for name, run := range map[string]func(context.Context, []string) error{"xl-recv": XLRecv, "serve": Serve} {
		err := run(ctx, []string{"--listen", "127.0.0.1:0"})
		if err == nil || !strings.Contains(err.Error(), "--insecure-allow-anonymous") {
			t.Errorf("%s without certificates: %v, want a refusal naming --insecure-allow-anonymous", name, err)
		}
	}
	err := XLSend(ctx, []string{"--port", "1", "127.0.0.1", "xl", "migrate-receive"})
	if err == nil || !strings.Contains(err.Error(), "--insecure-allow-anonymous") {
		t.Errorf("xl-send without certificates: %v, want a refusal naming --insecure-allow-anonymous", err)
	}
}
