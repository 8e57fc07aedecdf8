package labkit

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// ControlPlane is etcd plus kube-apiserver on loopback, as
// hack/controlplane.sh runs them for the demo. The API server knows every
// identity by a static token (there is no ServiceAccount token issuer a
// harness could use) and authorizes with RBAC.
type ControlPlane struct {
	Port  int               // the API server's secure port on 127.0.0.1
	Token string            // the admin's (system:masters)
	users map[string]string // token by user name, for the other identities
}

// APIUser is an identity the API server knows by a static token.
type APIUser struct {
	Name   string
	Groups []string
}

// ControlPlaneConfig says how to start a ControlPlane.
type ControlPlaneConfig struct {
	BinDir   string    // holds etcd and kube-apiserver (hack/tools.sh)
	Dir      string    // for certificates, tokens, keys and etcd's data
	Users    []APIUser // identities besides the admin
	Env      []string  // environment of etcd and kube-apiserver
	EtcdArgs []string  // flags added to etcd's
}

// FreePort is a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func newToken() (string, error) {
	tb := make([]byte, 24)
	_, err := rand.Read(tb)
	return hex.EncodeToString(tb), err
}

// StartControlPlane starts etcd and kube-apiserver through ps and waits
// (at most 150 s) until the API server is ready. The processes are ps's:
// ps.StopAll stops them.
func StartControlPlane(ctx context.Context, ps *Procs, c ControlPlaneConfig) (*ControlPlane, error) {
	binDir, dir := c.BinDir, c.Dir
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return nil, fmt.Errorf("%s/%s is missing: run hack/tools.sh (or make tools) first", binDir, b)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o755); err != nil {
		return nil, err
	}
	var ports [3]int
	for i := range ports {
		p, err := FreePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	cp := &ControlPlane{Port: ports[2], users: map[string]string{}}
	var err error
	if cp.Token, err = newToken(); err != nil {
		return nil, err
	}
	csv := cp.Token + ",xenferry-admin,xenferry-admin,system:masters\n"
	for _, u := range c.Users {
		t, err := newToken()
		if err != nil {
			return nil, err
		}
		cp.users[u.Name] = t
		csv += fmt.Sprintf("%s,%s,%s,%q\n", t, u.Name, u.Name, strings.Join(u.Groups, ","))
	}
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(csv), 0o600); err != nil {
		return nil, err
	}
	if err := writeSAKey(filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")); err != nil {
		return nil, err
	}
	eurl := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	purl := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	etcdArgs := append([]string{"--name", "xff", "--data-dir", filepath.Join(dir, "etcd-data"),
		"--listen-client-urls", eurl, "--advertise-client-urls", eurl,
		"--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
		"--initial-cluster", "xff=" + purl, "--log-level", "warn"}, c.EtcdArgs...)
	if _, err := ps.Start("etcd", c.Env, filepath.Join(binDir, "etcd"), etcdArgs...); err != nil {
		return nil, err
	}
	api, err := ps.Start("kube-apiserver", c.Env, filepath.Join(binDir, "kube-apiserver"),
		"--etcd-servers", eurl, "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(cp.Port), "--cert-dir", filepath.Join(dir, "certs"),
		"--token-auth-file", filepath.Join(dir, "tokens.csv"), "--authorization-mode", "RBAC",
		"--service-account-key-file", filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(dir, "sa.key"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range", "10.96.0.0/24", "--endpoint-reconciler-type", "none",
		"--disable-admission-plugins", "ServiceAccount")
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	deadline := time.Now().Add(150 * time.Second)
	for time.Now().Before(deadline) {
		if !api.Alive() {
			return nil, fmt.Errorf("kube-apiserver exited: %s", api.Tail(600))
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("https://127.0.0.1:%d/readyz", cp.Port), nil)
		req.Header.Set("Authorization", "Bearer "+cp.Token)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return cp, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("kube-apiserver not ready after 150s: %s", api.Tail(600))
}

// writeSAKey writes the key pair the API server signs and checks
// ServiceAccount tokens with (it refuses to start without one).
func writeSAKey(privPath, pubPath string) error {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	priv, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(privPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: priv}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644)
}

// URL is the API server's address as this program reaches it.
func (cp *ControlPlane) URL() string { return fmt.Sprintf("https://127.0.0.1:%d", cp.Port) }

// RESTConfig is the admin's client configuration. The API server's
// certificate is self-signed, so TLS is not verified.
func (cp *ControlPlane) RESTConfig() *rest.Config {
	return &rest.Config{Host: cp.URL(), BearerToken: cp.Token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 50, Burst: 100, Timeout: 20 * time.Second}
}

// Kubeconfig writes a kubeconfig for the API server at server (it differs
// from URL where a child reaches it through a forwarder) with user's token
// ("" for the admin).
func (cp *ControlPlane) Kubeconfig(path, server, user string) error {
	token := cp.Token
	if user != "" {
		var ok bool
		if token, ok = cp.users[user]; !ok {
			return fmt.Errorf("no API token for user %q", user)
		}
	}
	return os.WriteFile(path, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: xff
  cluster: {server: %q, insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: %q}
contexts:
- name: xff
  context: {cluster: xff, user: u, namespace: default}
current-context: xff
`, server, token)), 0o600)
}

// InstallCRDs installs the project's CRDs (config/crd/bases under root)
// and waits until the API server serves them.
func InstallCRDs(rc *rest.Config, root string) error {
	_, err := envtest.InstallCRDs(rc, envtest.CRDInstallOptions{Paths: []string{filepath.Join(root, "config", "crd", "bases")},
		ErrorIfPathMissing: true, MaxTime: 60 * time.Second})
	return err
}

// Scheme knows the built-in kinds and xenferry's.
func Scheme() (*runtime.Scheme, error) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := v1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	return scheme, nil
}
