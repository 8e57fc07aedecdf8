package pki

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// ErrNoCertificate: the identity has no certificate yet.
var ErrNoCertificate = errors.New("pki: no certificate yet")

// Material is one consistent set of TLS credentials: this side's key pair
// and the CAs it trusts for its peers.
type Material struct {
	Cert  tls.Certificate
	Leaf  *x509.Certificate
	Roots *x509.CertPool
}

// Source hands out the current Material. Every TLS handshake asks again,
// so a renewed certificate or CA bundle is used without a restart.
type Source interface {
	Current() (*Material, error)
}

// Identity is an in-memory Source whose material is replaced with Set (the
// agent under Kubernetes, which receives its certificate through the API).
// Safe for concurrent use.
type Identity struct {
	mu  sync.RWMutex
	key *ecdsa.PrivateKey
	m   *Material
	// certPEM and caPEM are what Set installed, for helper processes that
	// take files (node-agent xl-send under xl migrate).
	certPEM, caPEM []byte
}

// NewIdentity returns an Identity for key, without a certificate yet.
func NewIdentity(key *ecdsa.PrivateKey) *Identity { return &Identity{key: key} }

// Key is the identity's private key.
func (id *Identity) Key() *ecdsa.PrivateKey { return id.key }

// Set installs a certificate for the identity's key and the CA bundle to
// trust. A certificate for another key is refused.
func (id *Identity) Set(certPEM, caBundlePEM []byte) error {
	leaf, err := ParseCertPEM(certPEM)
	if err != nil {
		return err
	}
	if !publicKeysEqual(&id.key.PublicKey, leaf.PublicKey) {
		return fmt.Errorf("pki: certificate %q is for another key: %w", leaf.Subject.CommonName, ErrBadKey)
	}
	roots, err := Pool(caBundlePEM)
	if err != nil {
		return fmt.Errorf("pki: CA bundle: %w", err)
	}
	m := &Material{Cert: tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: id.key, Leaf: leaf}, Leaf: leaf, Roots: roots}
	id.mu.Lock()
	id.m = m
	id.certPEM, id.caPEM = append([]byte(nil), certPEM...), append([]byte(nil), caBundlePEM...)
	id.mu.Unlock()
	return nil
}

// PEM returns the installed certificate, the key and the CA bundle in PEM,
// or ErrNoCertificate before Set.
func (id *Identity) PEM() (certPEM, keyPEM, caPEM []byte, err error) {
	id.mu.RLock()
	certPEM, caPEM = id.certPEM, id.caPEM
	id.mu.RUnlock()
	if certPEM == nil {
		return nil, nil, nil, ErrNoCertificate
	}
	keyPEM, err = MarshalKeyPEM(id.key)
	return certPEM, keyPEM, caPEM, err
}

// Current implements Source.
func (id *Identity) Current() (*Material, error) {
	id.mu.RLock()
	defer id.mu.RUnlock()
	if id.m == nil {
		return nil, ErrNoCertificate
	}
	return id.m, nil
}

// FileSource reads a certificate, key and CA bundle from files (standalone
// mode, or files a cert-manager CSI driver keeps fresh). It re-reads them
// when any of them changed, checked at most once a second.
type FileSource struct {
	CertFile, KeyFile, CAFile string

	mu      sync.Mutex
	m       *Material
	stamp   string
	checked time.Time
}

// LoadFiles returns a FileSource after a first successful read.
func LoadFiles(certFile, keyFile, caFile string) (*FileSource, error) {
	fs := &FileSource{CertFile: certFile, KeyFile: keyFile, CAFile: caFile}
	if _, err := fs.Current(); err != nil {
		return nil, err
	}
	return fs, nil
}

// Current implements Source.
func (fs *FileSource) Current() (*Material, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	now := time.Now()
	if fs.m != nil && now.Sub(fs.checked) < time.Second {
		return fs.m, nil
	}
	fs.checked = now
	stamp := ""
	for _, p := range []string{fs.CertFile, fs.KeyFile, fs.CAFile} {
		st, err := os.Stat(p)
		if err != nil {
			if fs.m != nil {
				return fs.m, nil // keep serving the last good material during a rewrite
			}
			return nil, fmt.Errorf("pki: %w", err)
		}
		stamp += fmt.Sprintf("%s:%d:%d;", p, st.Size(), st.ModTime().UnixNano())
	}
	if fs.m != nil && stamp == fs.stamp {
		return fs.m, nil
	}
	m, err := fs.load()
	if err != nil {
		if fs.m != nil {
			return fs.m, nil
		}
		return nil, err
	}
	fs.m, fs.stamp = m, stamp
	return m, nil
}

func (fs *FileSource) load() (*Material, error) {
	pair, err := tls.LoadX509KeyPair(fs.CertFile, fs.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("pki: load %s and %s: %w", fs.CertFile, fs.KeyFile, err)
	}
	ca, err := os.ReadFile(fs.CAFile)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	roots, err := Pool(ca)
	if err != nil {
		return nil, fmt.Errorf("pki: CA bundle %s: %w", fs.CAFile, err)
	}
	return &Material{Cert: pair, Leaf: pair.Leaf, Roots: roots}, nil
}

// ServerConfig is a TLS 1.3 server configuration that requires a client
// certificate issued by one of the source's CAs; any such client is
// accepted and PeerHost names it. Credentials are read per handshake.
func ServerConfig(src Source) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m, err := src.Current()
			if err != nil {
				return nil, err
			}
			cert := m.Cert
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{cert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    m.Roots,
			}, nil
		},
	}
}

// ClientConfig is a TLS 1.3 client configuration that presents the
// source's certificate and accepts only a server whose certificate, issued
// by one of the source's CAs, names serverName (DNS name or IP address).
func ClientConfig(src Source, serverName string) (*tls.Config, error) {
	if serverName == "" {
		return nil, errors.New("pki: client TLS needs the expected server name")
	}
	m, err := src.Current()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		RootCAs:    m.Roots,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			m, err := src.Current()
			if err != nil {
				return nil, err
			}
			c := m.Cert
			return &c, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			// The standard verification ran (chain to RootCAs, serverName in
			// the certificate's names); refuse anything that skipped it.
			if len(cs.VerifiedChains) == 0 {
				return errors.New("pki: server certificate not verified")
			}
			return nil
		},
	}, nil
}

// Dialer returns a dial function for engine.Options.Dial: TCP, then a TLS
// handshake, all within timeout, with the server required to be
// serverName.
func Dialer(src Source, serverName string, timeout time.Duration) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		cfg, err := ClientConfig(src, serverName)
		if err != nil {
			return nil, err
		}
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: timeout}, Config: cfg}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("tls to %s (%s): %w", serverName, addr, err)
		}
		return c, nil
	}
}

// Listener wraps ln so that every accepted connection is a *tls.Conn with
// ServerConfig(src). The handshake runs on the first read or write (or
// HandshakeContext); callers bound it with a deadline.
func Listener(ln net.Listener, src Source) net.Listener {
	return tls.NewListener(ln, ServerConfig(src))
}

// PeerHost is the verified identity of the peer of a completed handshake:
// the CommonName of the leaf of its verified chain, "" when the handshake
// is incomplete or verified nothing.
func PeerHost(cs tls.ConnectionState) string {
	if !cs.HandshakeComplete || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	return cs.VerifiedChains[0][0].Subject.CommonName
}
