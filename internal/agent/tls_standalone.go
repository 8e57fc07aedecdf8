package agent

// Standalone mTLS (serve, migrate, xl-send, xl-recv): certificates from
// files, made by `node-agent pki` for a lab or by any CA. Anonymous peers
// are refused unless --insecure-allow-anonymous, which says so loudly.

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/pki"
)

// tlsFlags are the standalone commands' transport security flags.
type tlsFlags struct {
	cert, key, ca string
	insecure      bool
}

func (f *tlsFlags) bind(fs *flag.FlagSet) {
	fs.StringVar(&f.cert, "tls-cert", "", "this host's certificate (PEM); with --tls-key and --tls-ca, required unless --insecure-allow-anonymous")
	fs.StringVar(&f.key, "tls-key", "", "this host's private key (PEM)")
	fs.StringVar(&f.ca, "tls-ca", "", "CA bundle (PEM) that peers' certificates must chain to")
	fs.BoolVar(&f.insecure, "insecure-allow-anonymous", false, "NO AUTHENTICATION, NO ENCRYPTION: plain TCP, anyone who reaches the port is served (isolated labs only)")
}

// source returns the mTLS credentials, or nil in anonymous mode (after a
// loud warning naming what is exposed).
func (f *tlsFlags) source(log logr.Logger, exposure string) (pki.Source, error) {
	if f.insecure {
		if f.cert != "" || f.key != "" || f.ca != "" {
			return nil, errors.New("--insecure-allow-anonymous and --tls-* together: choose one")
		}
		log.Info("WARNING: --insecure-allow-anonymous: no authentication and no encryption; anyone who can reach " +
			exposure + " can send or receive domains, and a receiving host runs what they send as root. Use it only on an isolated lab network.")
		return nil, nil
	}
	if f.cert == "" || f.key == "" || f.ca == "" {
		return nil, errors.New("mutual TLS needs --tls-cert, --tls-key and --tls-ca (make lab ones with `node-agent pki`); " +
			"--insecure-allow-anonymous opts out on an isolated lab network")
	}
	src, err := pki.LoadFiles(f.cert, f.key, f.ca)
	if err != nil {
		return nil, err
	}
	return src, nil
}

// listenDefault is the listen address when the flag was not given: every
// interface with mTLS (peers on other hosts must reach it), loopback only
// in anonymous mode, so that opting out of authentication never exposes a
// port by accident; an explicit --listen is always obeyed.
func listenDefault(fs *flag.FlagSet, listen string, anonymous bool, port int) string {
	explicit := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "listen" {
			explicit = true
		}
	})
	if explicit || !anonymous {
		return listen
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// dialFor returns a dialer that accepts only a server named serverName, or
// nil (plain TCP) in anonymous mode.
func dialFor(src pki.Source, serverName string) func(context.Context, string) (net.Conn, error) {
	if src == nil {
		return nil
	}
	return pki.Dialer(src, serverName, dialTimeout)
}

// serverNameOf is the host part of addr, the name a lab certificate
// carries (as a DNS name or an IP address) when no name is given.
func serverNameOf(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

// acceptTLS runs the server handshake on c within timeout and returns the
// TLS connection and the peer's verified host name.
func acceptTLS(ctx context.Context, c net.Conn, src pki.Source, timeout time.Duration) (net.Conn, string, error) {
	tc := tls.Server(c, pki.ServerConfig(src))
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		return nil, "", fmt.Errorf("tls handshake: %w", err)
	}
	return tc, pki.PeerHost(tc.ConnectionState()), nil
}

// PKI is `node-agent pki`: a lab CA and certificates for the standalone
// commands.
func PKI(_ context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: node-agent pki ca --dir DIR | pki issue --dir DIR --name HOST [--ip IP,...] [--dns NAME,...]")
	}
	fs := flag.NewFlagSet("pki "+args[0], flag.ContinueOnError)
	dir := fs.String("dir", "", "directory of the lab CA (ca.crt, ca.key) and the host files (HOST.crt, HOST.key)")
	name := fs.String("name", "", "issue: the host's name (certificate CommonName and DNS name)")
	ips := fs.String("ip", "", "issue: comma-separated IP addresses the host is reached at")
	dns := fs.String("dns", "", "issue: comma-separated extra DNS names")
	life := fs.Duration("lifetime", pki.DefaultCertLifetime, "issue: certificate lifetime")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("--dir is required")
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	caCrt, caKey := filepath.Join(*dir, "ca.crt"), filepath.Join(*dir, "ca.key")
	now := time.Now()
	switch args[0] {
	case "ca":
		if _, err := os.Stat(caKey); err == nil {
			return fmt.Errorf("%s exists: refusing to replace a CA", caKey)
		}
		ca, err := pki.NewCA("xenferry-lab-ca", now, pki.DefaultCALifetime)
		if err != nil {
			return err
		}
		k, err := ca.KeyPEM()
		if err != nil {
			return err
		}
		if err := writeFiles(map[string][]byte{caCrt: ca.CertPEM, caKey: k}); err != nil {
			return err
		}
		fmt.Println(caCrt)
		return nil
	case "issue":
		if *name == "" {
			return errors.New("--name is required")
		}
		if strings.ContainsAny(*name, "/\\") {
			return fmt.Errorf("host name %q contains a path separator", *name)
		}
		crt, err := os.ReadFile(caCrt)
		if err != nil {
			return fmt.Errorf("read the lab CA (make it with `node-agent pki ca --dir %s`): %w", *dir, err)
		}
		key, err := os.ReadFile(caKey)
		if err != nil {
			return err
		}
		ca, err := pki.LoadCA(crt, key)
		if err != nil {
			return err
		}
		certPEM, keyPEM, err := ca.IssueHost(*name, splitList(*dns), splitList(*ips), now, *life)
		if err != nil {
			return err
		}
		out := filepath.Join(*dir, *name)
		if err := writeFiles(map[string][]byte{out + ".crt": certPEM, out + ".key": keyPEM}); err != nil {
			return err
		}
		fmt.Println(out + ".crt")
		return nil
	}
	return fmt.Errorf("unknown pki command %q (ca, issue)", args[0])
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// writeFiles writes each file 0600 (keys are secret; certificates do not
// need to be but stay with their keys).
func writeFiles(files map[string][]byte) error {
	for p, b := range files {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	return nil
}
