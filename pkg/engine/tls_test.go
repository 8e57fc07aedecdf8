package engine_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// testCA issues leaf certificates naming hosts.
type testCA struct {
	t    *testing.T
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{t: t, cert: cert, key: key, pool: pool}
}

func (ca *testCA) leaf(host string) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		ca.t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: host},
		DNSNames: []string{host}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		ca.t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestTLSPeerHostReachesAuthorize: on a TLS listener the receiver
// completes the handshake and hands Authorize the CommonName of the
// peer's verified certificate.
func TestTLSPeerHostReachesAuthorize(t *testing.T) {
	requireRoot(t)
	ca := newTestCA(t)
	dst, err := sim.NewHost(sim.Config{Name: "dst", Memory: "1Gi", CPUs: 2, StateDir: t.TempDir()}, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	var mu sync.Mutex
	var peers []string
	r := &engine.Receiver{Host: dst, Log: testlog.New(t), Authorize: func(_ context.Context, req engine.AuthRequest) (*engine.Grant, error) {
		mu.Lock()
		peers = append(peers, req.PeerHost)
		mu.Unlock()
		return nil, context.Canceled // refuse: only the identity matters here
	}}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{ca.leaf("host-b")},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.pool, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = r.Serve(ctx, ln) }()

	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{Certificates: []tls.Certificate{ca.leaf("host-a")}, RootCAs: ca.pool,
		ServerName: "host-b", MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w := wire.NewWriter(c)
	_ = w.WriteStreamHeader()
	b, _ := wire.MarshalControl(nil, &wire.Control{Kind: "hello", MigrationID: "m", Streams: 1, Message: "main"})
	_ = w.Write(wire.TypeControl, b)
	_ = w.Flush()
	rd := wire.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := rd.ReadStreamHeader(); err != nil {
		t.Fatal(err)
	}
	rec, err := rd.Next()
	if err != nil {
		t.Fatal(err)
	}
	m, _ := wire.ParseControl(rec.Body)
	if m.Kind != "error" {
		t.Fatalf("answer %+v, want the refusal", m)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(peers) != 1 || peers[0] != "host-a" {
		t.Fatalf("Authorize saw peers %q, want [host-a]", peers)
	}
}
