package main

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
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// This file is hack/faults' process and control-plane handling (procs.go
// there), without network namespaces: every process of the fleet runs in
// this program's namespace, on loopback.

// procs starts and stops every process of a run. Each child runs in a
// process group of its own (so a Ctrl-C in the terminal reaches only this
// program, which then stops them in order) and gets SIGKILL should this
// program die (Pdeathsig), so nothing outlives a run.
type procs struct {
	logDir string
	mu     sync.Mutex
	list   []*proc
	seq    int
}

type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func (ps *procs) start(name string, env []string, bin string, args ...string) (*proc, error) {
	ps.mu.Lock()
	ps.seq++
	logPath := filepath.Join(ps.logDir, fmt.Sprintf("%02d-%s.log", ps.seq, name))
	ps.mu.Unlock()
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer lf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop asks politely (SIGTERM), then kills after grace.
func (p *proc) stop(grace time.Duration) {
	if !p.alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
		}
	}
}

// tail returns the last n bytes of the process's log.
func (p *proc) tail(n int64) string {
	f, err := os.Open(p.log)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	_, _ = f.ReadAt(b, off)
	return string(b)
}

// stopAll stops every process still running, newest first (agents and the
// controller before the control plane they talk to).
func (ps *procs) stopAll() {
	ps.mu.Lock()
	list := append([]*proc(nil), ps.list...)
	ps.list = nil
	ps.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].stop(5 * time.Second)
	}
}

// cleanEnv is this process's environment without variables that would
// change the children's behaviour (etcd reads every ETCD_* as a flag).
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "ETCD_") || strings.HasPrefix(kv, "XENFERRY_") || strings.HasPrefix(kv, "KUBECONFIG=") ||
			strings.HasPrefix(kv, "POD_NAMESPACE=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// controlPlane is etcd plus kube-apiserver on loopback, as
// hack/controlplane.sh runs them for the demo.
type controlPlane struct {
	port  int
	token string            // the admin's
	users map[string]string // token by user name, for the other identities
}

// apiUser is an identity the API server knows by a static token.
type apiUser struct {
	name   string
	groups []string
}

func freePort() (int, error) {
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

func startControlPlane(ctx context.Context, ps *procs, binDir, dir string, users []apiUser) (*controlPlane, error) {
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
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	cp := &controlPlane{port: ports[2], users: map[string]string{}}
	var err error
	if cp.token, err = newToken(); err != nil {
		return nil, err
	}
	csv := cp.token + ",xenferry-admin,xenferry-admin,system:masters\n"
	for _, u := range users {
		t, err := newToken()
		if err != nil {
			return nil, err
		}
		cp.users[u.name] = t
		csv += fmt.Sprintf("%s,%s,%s,%q\n", t, u.name, u.name, strings.Join(u.groups, ","))
	}
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(csv), 0o600); err != nil {
		return nil, err
	}
	if err := writeSAKey(filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")); err != nil {
		return nil, err
	}
	eurl := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	purl := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	if _, err := ps.start("etcd", cleanEnv(), filepath.Join(binDir, "etcd"),
		"--name", "xff", "--data-dir", filepath.Join(dir, "etcd-data"),
		"--listen-client-urls", eurl, "--advertise-client-urls", eurl,
		"--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
		"--initial-cluster", "xff="+purl, "--log-level", "warn", "--unsafe-no-fsync"); err != nil {
		return nil, err
	}
	api, err := ps.start("kube-apiserver", cleanEnv(), filepath.Join(binDir, "kube-apiserver"),
		"--etcd-servers", eurl, "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(cp.port), "--cert-dir", filepath.Join(dir, "certs"),
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
		if !api.alive() {
			return nil, fmt.Errorf("kube-apiserver exited: %s", api.tail(600))
		}
		req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("https://127.0.0.1:%d/readyz", cp.port), nil)
		req.Header.Set("Authorization", "Bearer "+cp.token)
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
	return nil, fmt.Errorf("kube-apiserver not ready after 150s: %s", api.tail(600))
}

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

// kubeconfig writes a kubeconfig for the API server with user's token
// ("" for the admin).
func (cp *controlPlane) kubeconfig(path, user string) error {
	token := cp.token
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
  cluster: {server: "https://127.0.0.1:%d", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: %q}
contexts:
- name: xff
  context: {cluster: xff, user: u, namespace: default}
current-context: xff
`, cp.port, token)), 0o600)
}
