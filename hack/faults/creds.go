package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/pki"
)

// caNamespace and caSecretName locate the lab CA: the controller runs with
// --ca-namespace caNamespace and keeps its CA in this Secret.
const (
	caNamespace  = "default"
	caSecretName = "xenferry-ca"
	// agentKeyFile is the agent's private key under its --state-dir.
	agentKeyFile = "agent-key.pem"
)

// peerCreds is everything about credentials in this program, in one place:
// which API identity each agent has, how agents and the controller are
// started, how this program reaches an agent's data port as a peer, and how
// it learns a migration's token.
type peerCreds interface {
	// apiIdentity is the API user (and groups) host's agent runs as; the
	// control plane gets a static token for it.
	apiIdentity(host string) (user string, groups []string)
	// agentArgs are extra node-agent flags for host.
	agentArgs(host string) []string
	// controllerArgs are extra controller flags.
	controllerArgs() []string
	// dial connects to an agent's data address from the hub namespace as a
	// peer with whatever credential a legitimate source presents.
	dial(ctx context.Context, addr string) (net.Conn, error)
	// dialPlain connects with no credential at all (plaintext-peer).
	dialPlain(ctx context.Context, addr string) (net.Conn, error)
	// migrationToken is the token the two agents use for migration m.
	migrationToken(ctx context.Context, m *v1.VMMigration) ([]byte, error)
}

// tlsCreds: agents speak mTLS with certificates the controller signs from
// the CA Secret, and tokens are sealed per agent in the VMMigration status.
//
// The hostile peer is a compromised host: this program (root in the lab)
// reads the CA Secret and issues itself a certificate for hostA, the source
// of every migration, so it gets past the target's TLS handshake and is the
// peer the target expects. Tokens are the "leaked token" model: the
// program opens the target's sealed token with the target agent's private
// key from its state dir, which only root on the target host can read.
type tlsCreds struct {
	l *lab

	mu sync.Mutex
	id *pki.Identity // the hostile peer's identity, issued on first use
}

// apiIdentity: one user per agent, in system:masters (the lab has no
// ServiceAccount tokens for agents). Admission policies keyed on the
// xenferry-node-agent ServiceAccount therefore do not apply to lab agents.
func (*tlsCreds) apiIdentity(host string) (string, []string) {
	return "xenferry-agent:" + host, []string{"system:masters"}
}

// agentArgs: agents always speak mTLS; their key lives in --state-dir and
// their certificate comes through their XenHost status.
func (*tlsCreds) agentArgs(string) []string { return nil }

func (*tlsCreds) controllerArgs() []string { return []string{"--ca-namespace", caNamespace} }

// identity issues (once) a certificate for hostA from the lab CA Secret.
func (t *tlsCreds) identity(ctx context.Context) (*pki.Identity, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.id != nil {
		return t.id, nil
	}
	s := &corev1.Secret{}
	if err := t.l.c.Get(ctx, types.NamespacedName{Namespace: caNamespace, Name: caSecretName}, s); err != nil {
		return nil, fmt.Errorf("CA Secret %s/%s: %w", caNamespace, caSecretName, err)
	}
	ca, err := pki.LoadCA(s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey])
	if err != nil {
		return nil, fmt.Errorf("CA Secret %s/%s: %w", caNamespace, caSecretName, err)
	}
	key, err := pki.GenerateKey()
	if err != nil {
		return nil, err
	}
	csr, err := pki.CreateCSR(key, hostA)
	if err != nil {
		return nil, err
	}
	cert, err := ca.Sign(csr, hostA, time.Now(), time.Hour)
	if err != nil {
		return nil, fmt.Errorf("issue a certificate for %s: %w", hostA, err)
	}
	bundle := s.Data["ca.crt"]
	if len(bundle) == 0 {
		bundle = ca.CertPEM
	}
	id := pki.NewIdentity(key)
	if err := id.Set(cert, bundle); err != nil {
		return nil, err
	}
	t.id = id
	return id, nil
}

// serverName is the host whose agent listens on addr (the fault proxy
// forwards to hostB).
func (t *tlsCreds) serverName(addr string) string {
	for h, a := range t.l.agents {
		if a.dataAddr == addr {
			return h
		}
	}
	return hostB
}

func (t *tlsCreds) dial(ctx context.Context, addr string) (net.Conn, error) {
	id, err := t.identity(ctx)
	if err != nil {
		return nil, err
	}
	cfg, err := pki.ClientConfig(id, t.serverName(addr))
	if err != nil {
		return nil, err
	}
	c, err := dialIn(ctx, t.l.net.hub, addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(c, cfg)
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	return tc, nil
}

func (t *tlsCreds) dialPlain(ctx context.Context, addr string) (net.Conn, error) {
	return dialIn(ctx, t.l.net.hub, addr)
}

// migrationToken opens m's target token with the target agent's key from
// its state dir (the leaked-token model above).
func (t *tlsCreds) migrationToken(_ context.Context, m *v1.VMMigration) ([]byte, error) {
	if m.Status.Tokens == nil || len(m.Status.Tokens.Target) == 0 {
		return nil, fmt.Errorf("migration %s carries no sealed token yet", m.Name)
	}
	a := t.l.agents[m.Status.TargetHost]
	if a == nil || a.stateDir == "" {
		return nil, fmt.Errorf("migration %s: no state dir for target %q", m.Name, m.Status.TargetHost)
	}
	b, err := os.ReadFile(filepath.Join(a.stateDir, agentKeyFile))
	if err != nil {
		return nil, fmt.Errorf("target key of %s: %w", m.Name, err)
	}
	key, err := pki.ParseAgentKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("target key of %s: %w", m.Name, err)
	}
	tok, err := pki.Open(key, m.Status.Tokens.Target,
		pki.Binding(string(m.UID), m.Spec.Domain, m.Status.SourceHost, m.Status.TargetHost, v1.TokenRoleTarget))
	if err != nil {
		return nil, fmt.Errorf("open the target token of %s: %w", m.Name, err)
	}
	return tok, nil
}
