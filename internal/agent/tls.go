package agent

// The agent's identity under Kubernetes: a P-256 key kept under the state
// dir, a CSR published in its XenHost's status.tls, and the certificate and
// CA bundle the controller writes back. The data port serves only mTLS
// peers with a certificate of that CA; outgoing migrations accept only the
// migration's target host; each migration's token is sealed to this key.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/pki"
)

const (
	// agentKeyFile under the state dir holds the agent's private key.
	agentKeyFile = "agent-key.pem"
	// dialTimeout bounds TCP connect plus TLS handshake of one connection.
	dialTimeout = 10 * time.Second
)

// loadOrCreateKey reads the agent's key from dir, or creates it (0600 in a
// 0700 directory). The key never leaves the host: only its CSR does.
func loadOrCreateKey(dir string) (*ecdsa.PrivateKey, error) {
	if dir == "" {
		return nil, errors.New("agent: no state dir for the agent's key")
	}
	path := filepath.Join(dir, agentKeyFile)
	b, err := os.ReadFile(path)
	if err == nil {
		st, serr := os.Stat(path)
		if serr == nil && st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("agent key %s is readable by others (mode %v): chmod 600 it", path, st.Mode().Perm())
		}
		k, err := pki.ParseAgentKeyPEM(b)
		if err != nil {
			return nil, fmt.Errorf("agent key %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read agent key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir for the agent key: %w", err)
	}
	k, err := pki.GenerateKey()
	if err != nil {
		return nil, err
	}
	pemKey, err := pki.MarshalKeyPEM(k)
	if err != nil {
		return nil, err
	}
	// Write then rename: a crash never leaves a truncated key behind.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, pemKey, 0o600); err != nil {
		return nil, fmt.Errorf("write agent key: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("write agent key: %w", err)
	}
	return k, nil
}

// tlsStatus puts this agent's CSR in h's status when it is missing or for
// another key (a new key after the state dir was lost, or a CSR someone
// else wrote). It reports whether h changed.
func (a *Agent) tlsStatus(h *v1.XenHost) (bool, error) {
	if h.Status.TLS != nil && h.Status.TLS.CSR != "" {
		if pub, err := pki.CSRPublicKey([]byte(h.Status.TLS.CSR)); err == nil && pub.Equal(&a.tls.Key().PublicKey) {
			return false, nil
		}
	}
	csr, err := pki.CreateCSR(a.tls.Key(), a.cfg.Host)
	if err != nil {
		return false, err
	}
	// A new request: whatever certificate is there is for another key.
	h.Status.TLS = &v1.HostTLS{CSR: string(csr)}
	a.log.Info("Published a certificate request")
	return true, nil
}

// installCert takes the certificate and CA bundle from h's status when
// they changed; the next TLS handshake uses them (renewal needs no
// restart: the controller re-issues at 2/3 of the lifetime).
func (a *Agent) installCert(h *v1.XenHost) {
	t := h.Status.TLS
	if t == nil || t.Certificate == "" || t.CABundle == "" {
		return
	}
	if cur, err := a.tls.Current(); err == nil && bytes.Equal(cur.Leaf.Raw, mustDER(t.Certificate)) && a.installedBundle == t.CABundle {
		return
	}
	if err := a.tls.Set([]byte(t.Certificate), []byte(t.CABundle)); err != nil {
		// A certificate for a previous key, or garbage: wait for a new one.
		a.log.Info("Ignored the certificate in the XenHost status", "reason", err.Error())
		return
	}
	a.installedBundle = t.CABundle
	cur, _ := a.tls.Current()
	a.log.Info("Installed certificate", "serial", cur.Leaf.SerialNumber.Text(16), "notAfter", cur.Leaf.NotAfter)
}

func mustDER(certPEM string) []byte {
	c, err := pki.ParseCertPEM([]byte(certPEM))
	if err != nil {
		return nil
	}
	return c.Raw
}

// certLoop installs the certificate as soon as the controller wrote it
// (the heartbeat would see it only later), then keeps looking at the
// heartbeat's pace for renewals.
func (a *Agent) certLoop(ctx context.Context) {
	if !a.mgr.GetCache().WaitForCacheSync(ctx) {
		return
	}
	fast := 200 * time.Millisecond
	for {
		h := &v1.XenHost{}
		if err := a.c.Get(ctx, types.NamespacedName{Name: a.cfg.Host}, h); err == nil {
			a.installCert(h)
		}
		wait := a.cfg.HeartbeatInterval
		if _, err := a.tls.Current(); err != nil {
			wait = fast
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// haveCert reports an error until the agent holds a certificate.
func (a *Agent) haveCert() error {
	if _, err := a.tls.Current(); err != nil {
		return fmt.Errorf("agent %s has no certificate from the controller yet: %w", a.cfg.Host, err)
	}
	return nil
}

// dialer connects to the migration's target over mTLS and accepts only a
// server whose certificate names targetHost.
func (a *Agent) dialer(targetHost string) func(ctx context.Context, addr string) (net.Conn, error) {
	return pki.Dialer(a.tls, targetHost, dialTimeout)
}

// openToken opens this agent's sealed token of m, bound to m's UID,
// domain, hosts and this agent's role in it.
func (a *Agent) openToken(m *v1.VMMigration) ([]byte, error) {
	if err := a.haveCert(); err != nil {
		return nil, err
	}
	tk := m.Status.Tokens
	if tk == nil {
		return nil, fmt.Errorf("VMMigration %s/%s carries no sealed token yet", m.Namespace, m.Name)
	}
	role, sealed := v1.TokenRoleSource, tk.Source
	if a.cfg.Host == m.Status.TargetHost {
		role, sealed = v1.TokenRoleTarget, tk.Target
	}
	tok, err := pki.Open(a.tls.Key(), sealed, pki.Binding(string(m.UID), m.Spec.Domain, m.Status.SourceHost, m.Status.TargetHost, role))
	if err != nil {
		return nil, fmt.Errorf("VMMigration %s/%s: the %s token does not open with this agent's key: %w", m.Namespace, m.Name, role, err)
	}
	if len(tok) < 16 {
		return nil, fmt.Errorf("VMMigration %s/%s: the token is shorter than 16 bytes", m.Namespace, m.Name)
	}
	return tok, nil
}
