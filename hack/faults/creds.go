package main

import (
	"context"
	"fmt"
	"net"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// peerCreds is everything about credentials in this program, in one place:
// which API identity each agent has, how agents are started, how this
// program reaches an agent's data port as
// a peer, and where a migration's token is read. Today agents speak plain
// TCP and tokens sit in a Secret named by the migration's status. When
// mTLS lands, a tlsCreds implements the same interface: agentArgs adds the
// agents' TLS flags (certificates come from their XenHost status, signed by
// the controller's CA), dial wraps the connection in tls.Client with a
// certificate this program issues from the CA Secret (an attacker holding a
// valid host identity, which is what the token cells need), and
// migrationToken follows the sealed-token fields.
type peerCreds interface {
	// apiIdentity is the API user (and groups) host's agent runs as; the
	// control plane gets a static token for it.
	apiIdentity(host string) (user string, groups []string)
	// agentArgs are extra node-agent flags for host.
	agentArgs(host string) []string
	// dial connects to an agent's data address from the hub namespace as a
	// peer with whatever credential a legitimate source presents.
	dial(ctx context.Context, addr string) (net.Conn, error)
	// dialPlain connects with no credential at all (plaintext-peer).
	dialPlain(ctx context.Context, addr string) (net.Conn, error)
	// migrationToken is the token the two agents use for migration m.
	migrationToken(ctx context.Context, m *v1.VMMigration) ([]byte, error)
}

// plainCreds: agents without TLS (main today).
type plainCreds struct{ l *lab }

// apiIdentity: one user per agent, still in system:masters. When the
// agents' least-privilege RBAC lands, this names the identity it binds
// (and the groups it expects), so each agent runs with only its rights.
func (plainCreds) apiIdentity(host string) (string, []string) {
	return "xenferry-agent:" + host, []string{"system:masters"}
}

func (plainCreds) agentArgs(string) []string { return nil }

func (p plainCreds) dial(ctx context.Context, addr string) (net.Conn, error) {
	return dialIn(ctx, p.l.net.hub, addr)
}

func (p plainCreds) dialPlain(ctx context.Context, addr string) (net.Conn, error) {
	return dialIn(ctx, p.l.net.hub, addr)
}

func (p plainCreds) migrationToken(ctx context.Context, m *v1.VMMigration) ([]byte, error) {
	if m.Status.TokenSecret == "" {
		return nil, fmt.Errorf("migration %s names no token Secret yet", m.Name)
	}
	s := &corev1.Secret{}
	if err := p.l.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.TokenSecret}, s); err != nil {
		return nil, fmt.Errorf("token Secret of %s: %w", m.Name, err)
	}
	tok := s.Data[v1.TokenKey]
	if len(tok) == 0 {
		return nil, fmt.Errorf("token Secret %s has no %q", s.Name, v1.TokenKey)
	}
	return tok, nil
}
