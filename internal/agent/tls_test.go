package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/pki"
)

func waitCertInstalled(t *testing.T, ta *testAgent) {
	t.Helper()
	waitFor(t, "certificate of "+ta.name, 15*time.Second, func() (bool, string) {
		err := ta.agent.haveCert()
		return err == nil, errString(err)
	})
}

// probe dials with dial and reads once: TLS 1.3 delivers the server's
// verdict on the client certificate after the client's handshake, so an
// accepted client times out reading and a refused one gets an error.
func probe(dial func(context.Context, string) (net.Conn, error), addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dial(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return nil
	}
	return err
}

// The data port under Kubernetes talks only to agents with a certificate
// of the cluster's CA, and an outgoing connection reaches only the host it
// was meant for.
func TestAgentDataPortRequiresMutualTLS(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	startController(t, ctrlOpts{})
	a := startAgent(t, ns+"-a", "1Gi")
	b := startAgent(t, ns+"-b", "1Gi")
	waitCertInstalled(t, a)
	waitCertInstalled(t, b)
	addr := b.agent.DataAddress()

	t.Run("an agent of the cluster reaches the host it expects", func(t *testing.T) {
		if err := probe(a.agent.dialer(b.name), addr); err != nil {
			t.Fatalf("a -> b over mTLS: %v", err)
		}
	})
	t.Run("a plaintext peer is refused", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// What an old agent would send: the engine's stream start.
		_, _ = c.Write([]byte("XENFERRY\x00\x01hello migration plaintext"))
		_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
		got, err := io.ReadAll(c)
		if ne := (net.Error)(nil); errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the data port kept a plaintext peer open past the handshake deadline")
		}
		// At most a TLS alert record (content type 21) comes back.
		if len(got) > 0 && got[0] != 21 {
			t.Fatalf("the data port answered a plaintext peer with %q", got)
		}
	})
	t.Run("a certificate from another CA is refused", func(t *testing.T) {
		evil, err := pki.NewCA("evil", time.Now(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		key, _ := pki.GenerateKey()
		csr, _ := pki.CreateCSR(key, a.name)
		certPEM, err := evil.Sign(csr, a.name, time.Now(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		// It trusts the real CA (so it accepts b) but presents evil's cert.
		bundle := caBundle(t, a.name)
		id := pki.NewIdentity(key)
		if err := id.Set(certPEM, bundle); err != nil {
			t.Fatal(err)
		}
		if err := probe(pki.Dialer(id, b.name, 5*time.Second), addr); err == nil {
			t.Fatal("b accepted a client certificate of another CA")
		}
	})
	t.Run("a valid agent that is not the expected host is refused by the client", func(t *testing.T) {
		// The migration's target is host c; an address that leads to b
		// (a rewritten status.target.address) must not receive the domain.
		err := probe(a.agent.dialer(ns+"-c"), addr)
		if err == nil || !strings.Contains(err.Error(), ns+"-c") {
			t.Fatalf("a dialing %s-c reached b: %v", ns, err)
		}
	})
	t.Run("the agent's key stays on the host, private", func(t *testing.T) {
		st, err := os.Stat(filepath.Join(b.agent.cfg.StateDir, agentKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Fatalf("key file mode %v, want 0600", st.Mode().Perm())
		}
	})
	t.Run("the data port still serves the cluster's agents", func(t *testing.T) {
		if err := probe(a.agent.dialer(b.name), addr); err != nil {
			t.Fatalf("a -> b after the refusals: %v", err)
		}
	})
}

// caBundle is the CA bundle the controller gave host.
func caBundle(t *testing.T, host string) []byte {
	t.Helper()
	h := &v1.XenHost{}
	if err := k8s.Get(context.Background(), types.NamespacedName{Name: host}, h); err != nil {
		t.Fatal(err)
	}
	if h.Status.TLS == nil || h.Status.TLS.CABundle == "" {
		t.Fatalf("XenHost %s has no CA bundle", host)
	}
	return []byte(h.Status.TLS.CABundle)
}
