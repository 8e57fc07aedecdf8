package pki

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	mathbig "math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustCA(t *testing.T, name string, now time.Time) *CA {
	t.Helper()
	ca, err := NewCA(name, now, DefaultCALifetime)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// identity issues name a key and a certificate from ca, valid from now.
func identity(t *testing.T, ca *CA, name string, now time.Time, life time.Duration, bundle ...*CA) *Identity {
	t.Helper()
	key, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := CreateCSR(key, name)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Sign(csr, name, now, life)
	if err != nil {
		t.Fatal(err)
	}
	id := NewIdentity(key)
	var b []byte
	for _, c := range append([]*CA{ca}, bundle...) {
		b = append(b, c.CertPEM...)
	}
	if err := id.Set(cert, b); err != nil {
		t.Fatal(err)
	}
	return id
}

func TestCALoadRoundTripAndForeignKeyFormats(t *testing.T) {
	now := time.Now()
	ca := mustCA(t, "xenferry-ca", now)
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	back, err := LoadCA(ca.CertPEM, keyPEM)
	if err != nil {
		t.Fatalf("load a CA we wrote: %v", err)
	}
	if !back.Cert.Equal(ca.Cert) {
		t.Fatal("loaded CA certificate differs")
	}
	// SEC 1 ("EC PRIVATE KEY"), as cert-manager writes ECDSA keys by default.
	der, _ := x509.MarshalECPrivateKey(ca.Key.(*ecdsa.PrivateKey))
	if _, err := LoadCA(ca.CertPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})); err != nil {
		t.Fatalf("SEC 1 key: %v", err)
	}
	// A key of another CA is refused.
	other := mustCA(t, "other", now)
	otherKey, _ := other.KeyPEM()
	if _, err := LoadCA(ca.CertPEM, otherKey); !errors.Is(err, ErrBadKey) {
		t.Fatalf("mismatched key: %v, want ErrBadKey", err)
	}
	// An RSA CA (PKCS#1) signs P-256 agent certificates.
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: mathbig.NewInt(1), Subject: pkix.Name{CommonName: "rsa-ca"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour * 24 * 90),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rder, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &rk.PublicKey, rk)
	if err != nil {
		t.Fatal(err)
	}
	rca, err := LoadCA(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rder}),
		pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rk)}))
	if err != nil {
		t.Fatalf("RSA CA: %v", err)
	}
	id := identity(t, rca, "host-a", now, DefaultCertLifetime)
	if _, err := id.Current(); err != nil {
		t.Fatal(err)
	}
	// A leaf certificate is not a CA.
	leaf, _ := id.Current()
	if _, err := LoadCA(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Leaf.Raw}), keyPEM); err == nil {
		t.Fatal("a leaf certificate loaded as a CA")
	}
}

func TestSignChecksNameKeyAndSignature(t *testing.T) {
	now := time.Now()
	ca := mustCA(t, "ca", now)
	key, _ := GenerateKey()
	csr, _ := CreateCSR(key, "host-a")

	certPEM, err := ca.Sign(csr, "host-a", now, DefaultCertLifetime)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := ParseCertPEM(certPEM)
	if cert.Subject.CommonName != "host-a" || len(cert.DNSNames) != 1 || cert.DNSNames[0] != "host-a" {
		t.Fatalf("certificate names %q %v, want host-a only", cert.Subject.CommonName, cert.DNSNames)
	}
	if !SamePublicKey(&key.PublicKey, cert.PublicKey) {
		t.Fatal("certificate is for another key")
	}
	pool, _ := Pool(ca.CertPEM)
	if _, _, err := VerifyHost(certPEM, pool, "host-a", now); err != nil {
		t.Fatalf("VerifyHost: %v", err)
	}
	if _, _, err := VerifyHost(certPEM, pool, "host-b", now); err == nil {
		t.Fatal("VerifyHost accepted host-a's certificate as host-b's")
	}

	if _, err := ca.Sign(csr, "host-b", now, DefaultCertLifetime); !errors.Is(err, ErrNameMismatch) {
		t.Fatalf("CSR for host-a presented as host-b: %v, want ErrNameMismatch", err)
	}
	// A CSR whose signature does not match (a copied request with another name).
	bad := bytes.Replace(csr, []byte("A"), []byte("B"), 1)
	if _, err := ca.Sign(bad, "host-a", now, DefaultCertLifetime); err == nil {
		t.Fatal("a corrupted CSR was signed")
	}
	// RSA keys cannot receive sealed tokens: refused.
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	rder, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "host-a"}}, rk)
	if _, err := ca.Sign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: rder}), "host-a", now, DefaultCertLifetime); !errors.Is(err, ErrBadKey) {
		t.Fatalf("RSA CSR: %v, want ErrBadKey", err)
	}
	// P-384 neither.
	k384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	d384, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "host-a"}}, k384)
	csr384 := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: d384})
	if _, err := ca.Sign(csr384, "host-a", now, DefaultCertLifetime); !errors.Is(err, ErrBadKey) {
		t.Fatalf("P-384 CSR: %v, want ErrBadKey", err)
	}
	if _, err := ca.Sign([]byte("not a csr"), "host-a", now, DefaultCertLifetime); !errors.Is(err, ErrBadCSR) {
		t.Fatalf("garbage: %v, want ErrBadCSR", err)
	}
	// A certificate never outlives its CA.
	short, _ := NewCA("short", now, 48*time.Hour)
	c2, err := short.Sign(csr, "host-a", now, DefaultCertLifetime)
	if err != nil {
		t.Fatal(err)
	}
	if cert2, _ := ParseCertPEM(c2); cert2.NotAfter.After(short.Cert.NotAfter) {
		t.Fatalf("certificate ends %s after its CA (%s)", cert2.NotAfter, short.Cert.NotAfter)
	}
}

func TestNeedsRenewalAtTwoThirds(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := &x509.Certificate{NotBefore: start, NotAfter: start.Add(30 * time.Hour)}
	for _, tc := range []struct {
		at   time.Duration
		want bool
	}{{-time.Minute, true}, {0, false}, {19 * time.Hour, false}, {20 * time.Hour, true}, {31 * time.Hour, true}} {
		if got := NeedsRenewal(c, start.Add(tc.at)); got != tc.want {
			t.Errorf("NeedsRenewal at +%s = %v, want %v", tc.at, got, tc.want)
		}
	}
}

// serve accepts one connection on a real TCP listener with ServerConfig and
// reports the verified peer (or the handshake error).
func serve(t *testing.T, src Source) (addr string, peer <-chan string, errc <-chan error) {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := Listener(raw, src)
	t.Cleanup(func() { ln.Close() })
	p, e := make(chan string, 1), make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			e <- err
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := tc.HandshakeContext(ctx); err != nil {
			e <- err
			return
		}
		p <- PeerHost(tc.ConnectionState())
		_, _ = io.Copy(io.Discard, c)
	}()
	return raw.Addr().String(), p, e
}

func dial(src Source, server, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dialer(src, server, 5*time.Second)(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	// TLS 1.3: the server's verdict on the client certificate arrives
	// after the client's handshake; a read surfaces it.
	_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return nil
	}
	return err
}

func TestMutualTLS(t *testing.T) {
	now := time.Now()
	ca := mustCA(t, "ca", now)
	a := identity(t, ca, "host-a", now, DefaultCertLifetime)
	b := identity(t, ca, "host-b", now, DefaultCertLifetime)

	t.Run("agents of one CA: the server learns the client's host", func(t *testing.T) {
		addr, peer, errc := serve(t, b)
		if err := dial(a, "host-b", addr); err != nil {
			t.Fatalf("dial: %v", err)
		}
		select {
		case p := <-peer:
			if p != "host-a" {
				t.Fatalf("PeerHost %q, want host-a", p)
			}
		case err := <-errc:
			t.Fatalf("server: %v", err)
		}
	})
	t.Run("the client refuses a valid server of another host", func(t *testing.T) {
		c := identity(t, ca, "host-c", now, DefaultCertLifetime)
		addr, _, _ := serve(t, c)
		err := dial(a, "host-b", addr)
		if err == nil || !strings.Contains(err.Error(), "host-b") {
			t.Fatalf("dial host-b reaching host-c: %v, want a name error", err)
		}
	})
	t.Run("a client of another CA is refused", func(t *testing.T) {
		evil := identity(t, mustCA(t, "evil", now), "host-a", now, DefaultCertLifetime, ca)
		addr, _, errc := serve(t, b)
		_ = dial(evil, "host-b", addr)
		if err := <-errc; err == nil {
			t.Fatal("server accepted a client certificate of another CA")
		}
	})
	t.Run("a server of another CA is refused", func(t *testing.T) {
		evil := identity(t, mustCA(t, "evil", now), "host-b", now, DefaultCertLifetime)
		addr, _, _ := serve(t, evil)
		if err := dial(a, "host-b", addr); err == nil {
			t.Fatal("client accepted a server certificate of another CA")
		}
	})
	t.Run("an expired client certificate is refused", func(t *testing.T) {
		old := identity(t, ca, "host-a", now.Add(-48*time.Hour), time.Hour)
		addr, _, errc := serve(t, b)
		_ = dial(old, "host-b", addr)
		if err := <-errc; err == nil || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("server: %v, want an expired certificate error", err)
		}
	})
	t.Run("a plaintext client is refused", func(t *testing.T) {
		addr, _, errc := serve(t, b)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write([]byte("\x00\x00\x00\x10hello, plaintext"))
		defer c.Close()
		if err := <-errc; err == nil {
			t.Fatal("server completed a handshake with a plaintext client")
		}
	})
	t.Run("a client without a certificate is refused", func(t *testing.T) {
		addr, _, errc := serve(t, b)
		pool, _ := Pool(ca.CertPEM)
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "host-b", MinVersion: tls.VersionTLS13})
		if err == nil {
			_, _ = c.Read(make([]byte, 1))
			c.Close()
		}
		if err := <-errc; err == nil {
			t.Fatal("server accepted an anonymous client")
		}
	})
	t.Run("a renewed certificate is served at the next handshake", func(t *testing.T) {
		before, _ := b.Current()
		key := b.Key()
		csr, _ := CreateCSR(key, "host-b")
		cert, _ := ca.Sign(csr, "host-b", now, DefaultCertLifetime)
		if err := b.Set(cert, ca.CertPEM); err != nil {
			t.Fatal(err)
		}
		after, _ := b.Current()
		if after.Leaf.SerialNumber.Cmp(before.Leaf.SerialNumber) == 0 {
			t.Fatal("Set did not replace the certificate")
		}
		addr, _, _ := serve(t, b)
		cfg, _ := ClientConfig(a, "host-b")
		var seen *serialSeen
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			seen = &serialSeen{cs.PeerCertificates[0].SerialNumber.String()}
			return nil
		}
		c, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if seen == nil || seen.s != after.Leaf.SerialNumber.String() {
			t.Fatalf("server presented %v, want the renewed serial %s", seen, after.Leaf.SerialNumber)
		}
	})
	t.Run("a certificate for another key is refused by Set", func(t *testing.T) {
		other, _ := GenerateKey()
		csr, _ := CreateCSR(other, "host-b")
		cert, _ := ca.Sign(csr, "host-b", now, DefaultCertLifetime)
		if err := b.Set(cert, ca.CertPEM); !errors.Is(err, ErrBadKey) {
			t.Fatalf("Set with a foreign certificate: %v, want ErrBadKey", err)
		}
	})
}

type serialSeen struct{ s string }

func TestFileSourceReloadsRotatedFiles(t *testing.T) {
	now := time.Now()
	ca := mustCA(t, "ca", now)
	dir := t.TempDir()
	write := func() *x509.Certificate {
		certPEM, keyPEM, err := ca.IssueHost("host-a", nil, []string{"127.0.0.1"}, now, DefaultCertLifetime)
		if err != nil {
			t.Fatal(err)
		}
		for name, b := range map[string][]byte{"tls.crt": certPEM, "tls.key": keyPEM, "ca.crt": ca.CertPEM} {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		c, _ := ParseCertPEM(certPEM)
		return c
	}
	first := write()
	fs, err := LoadFiles(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	m, _ := fs.Current()
	if !m.Leaf.Equal(first) || len(m.Leaf.IPAddresses) != 1 {
		t.Fatal("first load: wrong certificate")
	}
	second := write()
	fs.mu.Lock()
	fs.checked = time.Time{} // skip the once-a-second throttle
	fs.mu.Unlock()
	m, _ = fs.Current()
	if !m.Leaf.Equal(second) {
		t.Fatal("rotated files were not reloaded")
	}
}

func TestSealOpen(t *testing.T) {
	key, _ := GenerateKey()
	tok := []byte("0123456789abcdef0123456789abcdef")
	bind := Binding("uid-1", "web", "host-a", "host-b", "target")
	sealed, err := Seal(&key.PublicKey, tok, bind)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, tok) {
		t.Fatal("the sealed box contains the token")
	}
	got, err := Open(key, sealed, bind)
	if err != nil || !bytes.Equal(got, tok) {
		t.Fatalf("Open: %q, %v", got, err)
	}
	for name, b := range map[string][]byte{
		"another migration": Binding("uid-2", "web", "host-a", "host-b", "target"),
		"another domain":    Binding("uid-1", "db", "host-a", "host-b", "target"),
		"another source":    Binding("uid-1", "web", "host-x", "host-b", "target"),
		"another target":    Binding("uid-1", "web", "host-a", "host-x", "target"),
		"the other role":    Binding("uid-1", "web", "host-a", "host-b", "source"),
		"shifted fields":    Binding("uid-1w", "eb", "host-a", "host-b", "target"),
	} {
		if _, err := Open(key, sealed, b); !errors.Is(err, ErrOpen) {
			t.Errorf("open with %s's binding: %v, want ErrOpen", name, err)
		}
	}
	other, _ := GenerateKey()
	if _, err := Open(other, sealed, bind); !errors.Is(err, ErrOpen) {
		t.Errorf("open with another key: %v, want ErrOpen", err)
	}
	for i := range sealed {
		bad := bytes.Clone(sealed)
		bad[i] ^= 0x40
		if _, err := Open(key, bad, bind); err == nil {
			t.Fatalf("a box with byte %d flipped opened", i)
		}
	}
	for _, n := range []int{0, 1, sealOverhead - 1} {
		if _, err := Open(key, sealed[:n], bind); !errors.Is(err, ErrOpen) {
			t.Errorf("a box truncated to %d bytes: %v, want ErrOpen", n, err)
		}
	}
	again, _ := Seal(&key.PublicKey, tok, bind)
	if bytes.Equal(again, sealed) {
		t.Fatal("two seals of one token are equal (no fresh ephemeral key)")
	}
}
