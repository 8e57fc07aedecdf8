// Package pki is xenferry's small certificate authority and the TLS and
// token-sealing pieces built on it. It uses the standard library only and
// knows nothing of Kubernetes: the controller keeps the CA in a Secret and
// moves CSRs and certificates through XenHost status; the agents hold their
// keys.
//
// Identities: an agent's certificate names its XenHost in the subject's
// CommonName and as its only DNS name; it is valid for both TLS server and
// client authentication. Keys are ECDSA P-256, because the controller also
// seals each migration's token to the agents' certified public keys (Seal).
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

const (
	// DefaultCertLifetime of an agent certificate; renewed at 2/3 of it.
	DefaultCertLifetime = 30 * 24 * time.Hour
	// DefaultCALifetime of a CA the controller creates; renewed at 2/3 of it,
	// which leaves the old CA a third of its life to stay in the bundle while
	// the agents' certificates are re-issued.
	DefaultCALifetime = 365 * 24 * time.Hour
	// clockSkew backdates NotBefore so that hosts whose clocks lag a little
	// accept a fresh certificate.
	clockSkew = 5 * time.Minute
	// maxPEM bounds what the parsers accept: a CSR or a bundle is small, and
	// these bytes come from objects other parties can write.
	maxPEM = 64 << 10
)

// Errors callers may test with errors.Is.
var (
	ErrBadCSR       = errors.New("pki: bad certificate request")
	ErrNameMismatch = errors.New("pki: name does not match")
	ErrBadKey       = errors.New("pki: unsupported key")
	ErrBadPEM       = errors.New("pki: bad PEM")
)

// CA is a signing certificate with its key.
type CA struct {
	Cert *x509.Certificate
	// Key signs; RSA, ECDSA and Ed25519 CA keys are accepted (a
	// cert-manager CA may be any of them); agents' keys are always P-256.
	Key crypto.Signer
	// CertPEM is Cert, PEM-encoded.
	CertPEM []byte
}

// NewCA creates a self-signed ECDSA P-256 CA valid from now for lifetime.
func NewCA(commonName string, now time.Time, lifetime time.Duration) (*CA, error) {
	key, err := GenerateKey()
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"xenferry"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(lifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// Only leaf certificates below this CA: it never signs another CA.
		MaxPathLenZero: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("pki: self-sign CA %q: %w", commonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: parse new CA: %w", err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// LoadCA parses a CA certificate and its private key (PKCS#8, SEC 1 or
// PKCS#1 PEM) and checks that they belong together and that the
// certificate may sign certificates.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	certs, err := ParseCertsPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: CA certificate: %w", err)
	}
	cert := certs[0]
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 && cert.KeyUsage != 0 {
		return nil, fmt.Errorf("pki: certificate %q is not a CA", cert.Subject.CommonName)
	}
	key, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("pki: the CA key does not match certificate %q: %w", cert.Subject.CommonName, ErrBadKey)
	}
	return &CA{Cert: cert, Key: key, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})}, nil
}

// KeyPEM returns the CA key as PKCS#8 PEM.
func (ca *CA) KeyPEM() ([]byte, error) { return MarshalKeyPEM(ca.Key) }

// Sign issues a certificate for the CSR if its CommonName is name and its
// key is ECDSA P-256. The certificate names name as CommonName and sole DNS
// name (whatever else the CSR asks for), serves both TLS roles, and ends at
// now+lifetime or when the CA ends, whichever is first.
func (ca *CA) Sign(csrPEM []byte, name string, now time.Time, lifetime time.Duration) ([]byte, error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	if csr.Subject.CommonName != name {
		return nil, fmt.Errorf("pki: CSR for %q presented as %q: %w", csr.Subject.CommonName, name, ErrNameMismatch)
	}
	pub, err := agentKey(csr.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("pki: CSR for %q: %w", name, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(lifetime)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("pki: CA %q expired at %s", ca.Cert.Subject.CommonName, ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: []string{"xenferry"}},
		DNSNames:     []string{name},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("pki: sign certificate for %q: %w", name, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// IssueHost creates a key and a certificate for name in one step, for lab
// set-ups where the CA signs locally. Extra DNS names and IP addresses may
// be added (a lab reaches its hosts by address).
func (ca *CA) IssueHost(name string, extraDNS []string, ips []string, now time.Time, lifetime time.Duration) (certPEM, keyPEM []byte, err error) {
	key, err := GenerateKey()
	if err != nil {
		return nil, nil, err
	}
	csr, err := CreateCSR(key, name)
	if err != nil {
		return nil, nil, err
	}
	certPEM, err = ca.Sign(csr, name, now, lifetime)
	if err != nil {
		return nil, nil, err
	}
	if len(extraDNS) > 0 || len(ips) > 0 {
		// Re-issue with the extra names: Sign deliberately ignores them.
		cert, _ := ParseCertPEM(certPEM)
		tmpl := *cert
		tmpl.DNSNames = append([]string{name}, extraDNS...)
		for _, s := range ips {
			ip := net.ParseIP(s)
			if ip == nil {
				return nil, nil, fmt.Errorf("pki: %q is not an IP address", s)
			}
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		}
		der, err := x509.CreateCertificate(rand.Reader, &tmpl, ca.Cert, &key.PublicKey, ca.Key)
		if err != nil {
			return nil, nil, fmt.Errorf("pki: sign certificate for %q: %w", name, err)
		}
		certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	keyPEM, err = MarshalKeyPEM(key)
	return certPEM, keyPEM, err
}

// GenerateKey creates an ECDSA P-256 key.
func GenerateKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: generate key: %w", err)
	}
	return k, nil
}

// CreateCSR returns a PEM certificate request for name signed by key.
func CreateCSR(key *ecdsa.PrivateKey, name string) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: name, Organization: []string{"xenferry"}},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("pki: create CSR for %q: %w", name, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ParseCSR decodes a PEM certificate request and checks its signature
// (proof that the requester holds the key).
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	if len(csrPEM) > maxPEM {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadCSR, len(csrPEM))
	}
	b, _ := pem.Decode(csrPEM)
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: no CERTIFICATE REQUEST block", ErrBadCSR)
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %w", ErrBadCSR, err)
	}
	return csr, nil
}

// CSRPublicKey returns the P-256 key of a valid CSR.
func CSRPublicKey(csrPEM []byte) (*ecdsa.PublicKey, error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	return agentKey(csr.PublicKey)
}

// agentKey accepts only ECDSA P-256 public keys.
func agentKey(pub any) (*ecdsa.PublicKey, error) {
	k, ok := pub.(*ecdsa.PublicKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: want ECDSA P-256, got %T", ErrBadKey, pub)
	}
	return k, nil
}

// ParseCertPEM decodes the first certificate of a PEM block list.
func ParseCertPEM(certPEM []byte) (*x509.Certificate, error) {
	cs, err := ParseCertsPEM(certPEM)
	if err != nil {
		return nil, err
	}
	return cs[0], nil
}

// ParseCertsPEM decodes every CERTIFICATE block; other blocks are an error.
func ParseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	if len(data) > maxPEM {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadPEM, len(data))
	}
	var out []*x509.Certificate
	rest := bytes.TrimSpace(data)
	for len(rest) > 0 {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, fmt.Errorf("%w: trailing data", ErrBadPEM)
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w: unexpected %s block", ErrBadPEM, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadPEM, err)
		}
		out = append(out, c)
		rest = bytes.TrimSpace(rest)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no certificate", ErrBadPEM)
	}
	return out, nil
}

// MarshalKeyPEM encodes a private key as PKCS#8 PEM.
func MarshalKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("pki: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseKeyPEM decodes a PKCS#8, SEC 1 (EC) or PKCS#1 (RSA) private key.
func ParseKeyPEM(keyPEM []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(keyPEM)
	if b == nil {
		return nil, fmt.Errorf("%w: no key block", ErrBadPEM)
	}
	var k any
	var err error
	switch b.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("%w: unexpected %s block", ErrBadPEM, b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadPEM, err)
	}
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		return k, nil
	case *rsa.PrivateKey:
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("%w: %T", ErrBadKey, k)
}

// ParseAgentKeyPEM decodes an agent's ECDSA P-256 private key.
func ParseAgentKeyPEM(keyPEM []byte) (*ecdsa.PrivateKey, error) {
	k, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, err
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: want ECDSA P-256, got %T", ErrBadKey, k)
	}
	return ek, nil
}

// NeedsRenewal reports whether cert has lived 2/3 of its lifetime at now
// (or is not valid yet or any more).
func NeedsRenewal(cert *x509.Certificate, now time.Time) bool {
	return !now.Before(RenewAt(cert)) || now.Before(cert.NotBefore)
}

// RenewAt is when cert is due for renewal: 2/3 of its lifetime.
func RenewAt(cert *x509.Certificate) time.Time {
	life := cert.NotAfter.Sub(cert.NotBefore)
	return cert.NotBefore.Add(life / 3 * 2)
}

// VerifyHost checks that certPEM was issued by one of roots for name and
// is valid at now; it returns the certificate's P-256 public key. The
// controller uses it before sealing a token to a key an agent published.
func VerifyHost(certPEM []byte, roots *x509.CertPool, name string, now time.Time) (*ecdsa.PublicKey, *x509.Certificate, error) {
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, nil, err
	}
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots: roots, CurrentTime: now, DNSName: name,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return nil, nil, fmt.Errorf("pki: certificate of %q: %w", name, err)
	}
	if cert.Subject.CommonName != name {
		return nil, nil, fmt.Errorf("pki: certificate names %q, want %q: %w", cert.Subject.CommonName, name, ErrNameMismatch)
	}
	pub, err := agentKey(cert.PublicKey)
	if err != nil {
		return nil, nil, err
	}
	return pub, cert, nil
}

// Pool builds a certificate pool from a PEM bundle.
func Pool(bundlePEM []byte) (*x509.CertPool, error) {
	certs, err := ParseCertsPEM(bundlePEM)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p, nil
}

// SamePublicKey reports whether two public keys are equal.
func SamePublicKey(a, b crypto.PublicKey) bool { return publicKeysEqual(a, b) }

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("pki: serial number: %w", err)
	}
	return s, nil
}
