package rbac

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/xenferry/xenferry/controllers"
)

// TestMetricsOnlyForAuthorizedScrapers runs a manager as the controller's
// ServiceAccount with the metrics options main.go uses, and scrapes it as
// the ServiceAccounts of a bound and an unbound scraper: only the one bound
// to xenferry-metrics-reader gets the metrics, and only over TLS.
func TestMetricsOnlyForAuthorizedScrapers(t *testing.T) {
	requireEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	addr := freeAddr(t)
	mgr, err := ctrl.NewManager(asServiceAccount(controllerUsr, ""), ctrl.Options{
		Scheme:                 scheme,
		Metrics:                controllers.MetricsOptions(addr, "", true),
		HealthProbeBindAddress: "0",
		Logger:                 testlog.New(t),
	})
	if err != nil {
		cancel()
		t.Fatalf("manager: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	})

	cs := kubernetes.NewForConfigOrDie(restCfg)
	const ns = "monitoring"
	mustCreate(t, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
	for _, sa := range []string{"prometheus", "nobody"} {
		mustCreate(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}})
	}
	mustCreate(t, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "prometheus-xenferry-metrics"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "xenferry-metrics-reader"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: "prometheus"}},
	})
	token := func(sa string) string {
		exp := int64(600)
		tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token for %s: %v", sa, err)
		}
		return tr.Status.Token
	}
	// The certificate is self-signed (no --metrics-cert-dir); what admits a
	// caller is its token.
	hc := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	scrape := func(scheme, bearer string) (int, string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+addr+"/metrics", nil)
		if err != nil {
			return 0, "", err
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return resp.StatusCode, string(body), err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, _, err := scrape("https", "")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics endpoint not up: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	cases := []struct {
		name, scheme, token string
		want                int
	}{
		{"no token", "https", "", http.StatusUnauthorized},
		// controller-runtime's filter answers a TokenReview that reports an
		// error (an unknown token does) with 500: refused all the same.
		{"a token the API server does not know", "https", "not-a-token", http.StatusInternalServerError},
		{"a ServiceAccount not bound to the metrics reader", "https", token("nobody"), http.StatusForbidden},
		{"the node agent's ServiceAccount", "https", agentToken(t, cs), http.StatusForbidden},
		{"plain HTTP", "http", token("prometheus"), http.StatusBadRequest},
		{"a ServiceAccount bound to the metrics reader", "https", token("prometheus"), http.StatusOK},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, body, err := scrape(c.scheme, c.token)
			if c.scheme == "http" && err != nil {
				// The TLS server answers 400 and closes, which the client
				// may see as a reset instead: refused either way.
				return
			}
			if err != nil {
				t.Fatalf("scrape: %v", err)
			}
			if code != c.want {
				t.Fatalf("status %d (%q); want %d", code, firstLine(body), c.want)
			}
			metrics := strings.Contains(body, "# TYPE ")
			if metrics != (c.want == http.StatusOK) {
				t.Fatalf("status %d, metrics in the body: %v (%q)", code, metrics, firstLine(body))
			}
		})
	}
}

// agentToken is a token of the node agent's ServiceAccount (the one
// config/rbac creates), which has no business reading metrics.
func agentToken(t *testing.T, cs kubernetes.Interface) string {
	t.Helper()
	exp := int64(600)
	tr, err := cs.CoreV1().ServiceAccounts(operatorNS).CreateToken(context.Background(), "xenferry-node-agent",
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for the node agent: %v", err)
	}
	return tr.Status.Token
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}
