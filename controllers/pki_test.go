package controllers

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	clocktesting "k8s.io/utils/clock/testing"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/pki"
)

// pkiEnv starts a real API server for one test (skipped without the
// envtest binaries unless CI is set) and returns an admin client.
func pkiEnv(t *testing.T) (client.Client, *runtime.Scheme, *envtest.Environment) {
	t.Helper()
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets, _ = filepath.Abs("../bin")
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(assets, b)); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("CI is set but %s is missing from %s", b, assets)
			}
			t.Skipf("%s not found in %s: run `make tools`", b, assets)
		}
	}
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1.AddToScheme(scheme)
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: assets,
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Logf("stop envtest: %v", err)
		}
	})
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c, scheme, env
}

// agentKey is what an agent does: a key and a CSR in its XenHost status.
func publishCSR(t *testing.T, c client.Client, host, cn string) *ecdsa.PrivateKey {
	t.Helper()
	ctx := context.Background()
	key, err := pki.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, cn)
	if err != nil {
		t.Fatal(err)
	}
	h := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: host}}
	if err := c.Create(ctx, h); err != nil {
		t.Fatalf("create XenHost %s: %v", host, err)
	}
	orig := h.DeepCopy()
	h.Status.TLS = &v1.HostTLS{CSR: string(csr)}
	if err := c.Status().Patch(ctx, h, client.MergeFrom(orig)); err != nil {
		t.Fatalf("publish CSR of %s: %v", host, err)
	}
	return key
}

func waitCert(t *testing.T, c client.Client, host string) *v1.XenHost {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		h := &v1.XenHost{}
		if err := c.Get(context.Background(), types.NamespacedName{Name: host}, h); err != nil {
			t.Fatal(err)
		}
		if h.Status.TLS != nil && h.Status.TLS.Certificate != "" {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("XenHost %s got no certificate: %+v", host, h.Status.TLS)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The controller signs an agent's CSR for its own XenHost only, keeps its
// CA in a Secret, and seals each migration's token so that only the
// migration's two agents, each in its role, can open it.
func TestPKIEnvtest(t *testing.T) {
	c, scheme, env := pkiEnv(t)
	ctx := context.Background()
	const ns = "default"
	skip := true
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme: scheme, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0",
		Logger:     testlog.New(t).WithName("pki"),
		Controller: config.Controller{SkipNameValidation: &skip},
	})
	if err != nil {
		t.Fatal(err)
	}
	clk := clocktesting.NewFakePassiveClock(time.Now())
	p := &PKIReconciler{Namespace: ns, Clock: clk}
	if err := p.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(mctx) }()
	stopMgr := sync.OnceFunc(func() { cancel(); <-done })
	t.Cleanup(stopMgr)

	keyA := publishCSR(t, c, "host-a", "host-a")
	keyB := publishCSR(t, c, "host-b", "host-b")
	// host-x's agent asks for host-a's name: refused.
	publishCSR(t, c, "host-x", "host-a")

	var caSecret corev1.Secret
	t.Run("a CSR naming its own XenHost is signed by the CA in the Secret", func(t *testing.T) {
		h := waitCert(t, c, "host-a")
		if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: DefaultCASecretName}, &caSecret); err != nil {
			t.Fatalf("CA Secret: %v", err)
		}
		if caSecret.Type != corev1.SecretTypeTLS || len(caSecret.Data[SecretKeyKey]) == 0 || len(caSecret.Data[SecretBundleKey]) == 0 {
			t.Fatalf("CA Secret type %s keys %v: want a kubernetes.io/tls Secret with ca.crt", caSecret.Type, keys(caSecret.Data))
		}
		if h.Status.TLS.CABundle != string(caSecret.Data[SecretCertKey]) {
			t.Fatal("the host's CA bundle is not the CA of the Secret")
		}
		roots, _ := pki.Pool([]byte(h.Status.TLS.CABundle))
		pub, cert, err := pki.VerifyHost([]byte(h.Status.TLS.Certificate), roots, "host-a", time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if !pub.Equal(&keyA.PublicKey) {
			t.Fatal("the certificate is not for the agent's key")
		}
		if h.Status.TLS.NotAfter == nil || !h.Status.TLS.NotAfter.Time.Equal(cert.NotAfter) {
			t.Fatalf("notAfter %v, certificate ends %s", h.Status.TLS.NotAfter, cert.NotAfter)
		}
		if got := cert.NotAfter.Sub(cert.NotBefore); got > pki.DefaultCertLifetime+time.Hour {
			t.Fatalf("certificate lives %s, want at most %s", got, pki.DefaultCertLifetime)
		}
	})
	t.Run("a CSR naming another host is not signed", func(t *testing.T) {
		waitCert(t, c, "host-b")
		time.Sleep(time.Second)
		h := &v1.XenHost{}
		if err := c.Get(ctx, types.NamespacedName{Name: "host-x"}, h); err != nil {
			t.Fatal(err)
		}
		if h.Status.TLS.Certificate != "" {
			t.Fatal("host-x received a certificate for host-a's name")
		}
	})
	t.Run("the token is sealed for the migration's two agents only", func(t *testing.T) {
		a, b := waitCert(t, c, "host-a"), waitCert(t, c, "host-b")
		r := &VMMigrationReconciler{PKI: p}
		m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "m", UID: "uid-1"}, Spec: v1.VMMigrationSpec{Domain: "web"}}
		if err := r.ensureToken(ctx, m, a, b); err != nil {
			t.Fatal(err)
		}
		tk := m.Status.Tokens
		if tk == nil || len(tk.Source) == 0 || len(tk.Target) == 0 {
			t.Fatalf("tokens %+v", tk)
		}
		bindSrc := pki.Binding("uid-1", "web", "host-a", "host-b", v1.TokenRoleSource)
		bindDst := pki.Binding("uid-1", "web", "host-a", "host-b", v1.TokenRoleTarget)
		fromSrc, err := pki.Open(keyA, tk.Source, bindSrc)
		if err != nil {
			t.Fatalf("the source cannot open its token: %v", err)
		}
		fromDst, err := pki.Open(keyB, tk.Target, bindDst)
		if err != nil {
			t.Fatalf("the target cannot open its token: %v", err)
		}
		if string(fromSrc) != string(fromDst) || len(fromSrc) != 32 {
			t.Fatal("the two agents hold different tokens")
		}
		if _, err := pki.Open(keyA, tk.Target, bindDst); err == nil {
			t.Fatal("the source opened the target's box")
		}
		if _, err := pki.Open(keyB, tk.Target, pki.Binding("uid-2", "web", "host-a", "host-b", v1.TokenRoleTarget)); err == nil {
			t.Fatal("the target's box opened for another migration")
		}
		other, _ := pki.GenerateKey()
		if _, err := pki.Open(other, tk.Target, bindDst); err == nil {
			t.Fatal("another key opened the target's box")
		}
		// ensureToken keeps the first token: the agents may already hold it.
		before := string(tk.Target)
		if err := r.ensureToken(ctx, m, a, b); err != nil || string(m.Status.Tokens.Target) != before {
			t.Fatalf("a second ensureToken changed the token (err %v)", err)
		}
		// Host-x has no certificate: nothing is sealed, the migration waits.
		x := &v1.XenHost{}
		_ = c.Get(ctx, types.NamespacedName{Name: "host-x"}, x)
		m2 := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "m2", UID: "uid-2"}, Spec: v1.VMMigrationSpec{Domain: "web"}}
		if err := r.ensureToken(ctx, m2, a, x); !errors.Is(err, errNoCertificate) || m2.Status.Tokens != nil {
			t.Fatalf("sealing for a host without a certificate: %v, want errNoCertificate", err)
		}
		// A certificate an agent wrote itself (another CA) is not trusted.
		evil, _ := pki.NewCA("evil", time.Now(), time.Hour)
		certPEM, _, _ := evil.IssueHost("host-x", nil, nil, time.Now(), time.Hour)
		x.Status.TLS.Certificate = string(certPEM)
		if err := r.ensureToken(ctx, m2, a, x); !errors.Is(err, errNoCertificate) {
			t.Fatalf("sealing to a self-made certificate: %v, want errNoCertificate", err)
		}
		if err := r.deleteToken(ctx, m); err != nil || m.Status.Tokens != nil {
			t.Fatalf("deleteToken left %+v (%v)", m.Status.Tokens, err)
		}
	})
	t.Run("a rotated CA reaches every host at once", func(t *testing.T) {
		a := waitCert(t, c, "host-a")
		oldB := waitCert(t, c, "host-b").Status.TLS.Certificate
		// Let the reconciles that follow each issuance pass: from here on
		// only the rotation may look at host-b.
		time.Sleep(time.Second)
		later := clk.Now().Add(pki.DefaultCALifetime * 2 / 3).Add(time.Hour)
		clk.SetTime(later)
		// Any look at any host finds the CA due: host-a asks again.
		orig := a.DeepCopy()
		csr, _ := pki.CreateCSR(keyA, "host-a")
		a.Status.TLS.CSR = string(csr)
		if err := c.Status().Patch(ctx, a, client.MergeFrom(orig)); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			b := &v1.XenHost{}
			_ = c.Get(ctx, types.NamespacedName{Name: "host-b"}, b)
			if b.Status.TLS.Certificate != oldB {
				certs, err := pki.ParseCertsPEM([]byte(b.Status.TLS.CABundle))
				if err != nil || len(certs) != 2 {
					t.Fatalf("host-b's bundle after the rotation: %d certificates (%v), want the new and the old CA", len(certs), err)
				}
				cert, _ := pki.ParseCertPEM([]byte(b.Status.TLS.Certificate))
				if cert.CheckSignatureFrom(certs[0]) != nil {
					t.Fatal("host-b's new certificate is not from the new CA")
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("host-b kept its certificate from the old CA after the rotation")
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	t.Run("the CA is rotated before it expires and the old one stays trusted", func(t *testing.T) {
		// This subtest drives reconcilers of its own; the manager's would
		// re-issue host-a's certificate from its CA behind their back.
		stopMgr()
		now := time.Now()
		rclk := clocktesting.NewFakePassiveClock(now)
		rp := &PKIReconciler{Client: c, APIReader: c, Namespace: ns, SecretName: "rotating-ca", Clock: rclk}
		rp.defaults(nil)
		st, err := rp.loadCA(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		old := st.ca.Cert
		later := now.Add(pki.DefaultCALifetime * 2 / 3).Add(time.Hour)
		st2, err := rp.loadCA(ctx, later)
		if err != nil {
			t.Fatal(err)
		}
		if st2.ca.Cert.Equal(old) {
			t.Fatal("the CA was not rotated at 2/3 of its lifetime")
		}
		certs, err := pki.ParseCertsPEM(st2.bundle)
		if err != nil || len(certs) != 2 || !certs[0].Equal(st2.ca.Cert) || !certs[1].Equal(old) {
			t.Fatalf("bundle after rotation: %d certificates (%v), want the new CA then the old", len(certs), err)
		}
		sec := &corev1.Secret{}
		_ = c.Get(ctx, types.NamespacedName{Namespace: ns, Name: "rotating-ca"}, sec)
		if b, _ := pki.ParseCertsPEM(sec.Data[SecretBundleKey]); len(b) != 2 {
			t.Fatalf("ca.crt in the Secret holds %d certificates, want 2", len(b))
		}
		// A fresh controller (no memory) reads the same state.
		fresh := &PKIReconciler{Client: c, APIReader: c, Namespace: ns, SecretName: "rotating-ca", Clock: rclk}
		fresh.defaults(nil)
		st3, err := fresh.loadCA(ctx, later)
		if err != nil || !st3.ca.Cert.Equal(st2.ca.Cert) || string(st3.bundle) != string(st2.bundle) {
			t.Fatalf("a restarted controller sees another CA state (err %v)", err)
		}
		// After the old CA expired it leaves the bundle.
		st4, err := fresh.loadCA(ctx, old.NotAfter.Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := pki.ParseCertsPEM(st4.bundle); len(b) != 1 {
			t.Fatalf("bundle after the old CA expired: %d certificates, want 1", len(b))
		}
		// Deleting the Secret replaces the CA and trusts nothing older.
		del := &corev1.Secret{}
		_ = c.Get(ctx, types.NamespacedName{Namespace: ns, Name: "rotating-ca"}, del)
		if err := c.Delete(ctx, del); err != nil {
			t.Fatal(err)
		}
		st5, err := fresh.loadCA(ctx, later)
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := pki.ParseCertsPEM(st5.bundle); len(b) != 1 || b[0].Equal(st2.ca.Cert) || b[0].Equal(old) {
			t.Fatalf("bundle after deleting the Secret: %d certificates, want only a new CA", len(b))
		}
		st2 = st5
		// A host certificate from an older CA is re-issued from the new one.
		rclk.SetTime(later)
		h := &v1.XenHost{}
		_ = c.Get(ctx, types.NamespacedName{Name: "host-a"}, h)
		rp.Recorder = nil
		if _, err := rp.Reconcile(ctx, reconcile.Request{NamespacedName: types.NamespacedName{Name: "host-a"}}); err != nil {
			t.Fatal(err)
		}
		_ = c.Get(ctx, types.NamespacedName{Name: "host-a"}, h)
		cert, _ := pki.ParseCertPEM([]byte(h.Status.TLS.Certificate))
		if cert.CheckSignatureFrom(st2.ca.Cert) != nil {
			t.Fatal("host-a's certificate was not re-issued by the rotated CA")
		}
	})
	t.Run("a cert-manager CA is used as it is and never rotated here", func(t *testing.T) {
		rk, _ := rsa.GenerateKey(rand.Reader, 2048)
		now := time.Now()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "cm-ca"}, NotBefore: now.Add(-time.Hour),
			NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &rk.PublicKey, rk)
		certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		sec := &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "cm-ca", Annotations: map[string]string{certManagerAnnotation: "xenferry-ca"}},
			Type:       corev1.SecretTypeTLS,
			Data: map[string][]byte{SecretCertKey: certPEM, SecretBundleKey: certPEM,
				SecretKeyKey: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rk)})},
		}
		if err := c.Create(ctx, sec); err != nil {
			t.Fatal(err)
		}
		cp := &PKIReconciler{Client: c, APIReader: c, Namespace: ns, SecretName: "cm-ca"}
		cp.defaults(nil)
		st, err := cp.loadCA(ctx, now.Add(20*time.Hour)) // past 2/3 of its life
		if err != nil {
			t.Fatal(err)
		}
		if st.ca.Cert.SerialNumber.Int64() != 7 {
			t.Fatal("the cert-manager CA was replaced")
		}
		csr, _ := pki.CreateCSR(keyA, "host-a")
		if _, err := st.ca.Sign(csr, "host-a", now, pki.DefaultCertLifetime); err != nil {
			t.Fatalf("sign with the cert-manager RSA CA: %v", err)
		}
	})
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
