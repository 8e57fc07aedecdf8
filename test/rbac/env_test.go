package rbac

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// The identities the deployment gives its two components (config/rbac,
// config/node-agent, config/manager), as the API server sees them.
const (
	operatorNS    = "xenferry-system"
	agentUser     = "system:serviceaccount:" + operatorNS + ":xenferry-node-agent"
	controllerUsr = "system:serviceaccount:" + operatorNS + ":xenferry-controller"
	// nodeNameExtra is set by the API server on a ServiceAccount token bound
	// to a pod: the name of the pod's Node.
	nodeNameExtra = "authentication.kubernetes.io/node-name"
	// tenantNS is where users keep their migrations and domains.
	tenantNS = "tenant"
)

var (
	restCfg *rest.Config
	admin   client.Client
	scheme  = runtime.NewScheme()
	envSkip string
)

// TestMain starts one kube-apiserver for the package and installs the
// deployment's RBAC and admission policies into it, read from the files
// config/default deploys. Without the envtest binaries every test skips,
// unless CI is set.
func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets, _ = filepath.Abs(filepath.Join("..", "..", "bin"))
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(assets, b)); err != nil {
			envSkip = fmt.Sprintf("%s not found in %s: run `make tools` (builds kube-apiserver and etcd from the Go module proxy, ~10 min cold)", b, assets)
			return m.Run()
		}
	}
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1.AddToScheme(scheme)
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: assets,
	}
	var err error
	if restCfg, err = env.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "start envtest: %v\n", err)
		return 1
	}
	defer func() {
		if err := env.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stop envtest: %v\n", err)
		}
	}()
	if err := setup(); err != nil {
		fmt.Fprintf(os.Stderr, "install the deployment's RBAC and policies: %v\n", err)
		return 1
	}
	return m.Run()
}

func requireEnv(t *testing.T) {
	t.Helper()
	if envSkip == "" {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set but the envtest tools are missing: %s", envSkip)
	}
	t.Skip(envSkip)
}

func setup() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var err error
	if admin, err = client.New(restCfg, client.Options{Scheme: scheme}); err != nil {
		return err
	}
	for _, ns := range []string{operatorNS, tenantNS} {
		if err := admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			return fmt.Errorf("create Namespace %s: %w", ns, err)
		}
	}
	for _, dir := range []string{"rbac", "policy"} {
		if err := applyKustomization(ctx, filepath.Join("..", "..", "config", dir)); err != nil {
			return err
		}
	}
	return waitForPolicies(ctx)
}

// applyKustomization creates every object of the files a kustomization.yaml
// lists, as they are (the namespace they name is the default install's).
func applyKustomization(ctx context.Context, dir string) error {
	raw, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		return err
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(raw, &k); err != nil {
		return fmt.Errorf("%s/kustomization.yaml: %w", dir, err)
	}
	if len(k.Resources) == 0 {
		return fmt.Errorf("%s/kustomization.yaml lists no resources", dir)
	}
	for _, f := range k.Resources {
		raw, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(raw), 4096)
		for {
			u := &unstructured.Unstructured{}
			if err := dec.Decode(&u.Object); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return fmt.Errorf("%s/%s: %w", dir, f, err)
			}
			if len(u.Object) == 0 {
				continue
			}
			if err := admin.Create(ctx, u); err != nil {
				return fmt.Errorf("%s/%s: create %s %s: %w", dir, f, u.GetKind(), u.GetName(), err)
			}
		}
	}
	return nil
}

// waitForPolicies returns once every node-agent policy denies a write that
// RBAC allows: the API server loads new policies asynchronously.
func waitForPolicies(ctx context.Context) error {
	probeHost := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "probe-host"}}
	probeDom := &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "probe-domain"}, Spec: v1.XenDomainSpec{DomainName: "probe"}}
	probeMig := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "probe-migration"}, Spec: v1.VMMigrationSpec{Domain: "probe"}}
	for _, o := range []client.Object{probeHost, probeDom, probeMig} {
		if err := admin.Create(ctx, o); err != nil {
			return fmt.Errorf("create probe: %w", err)
		}
	}
	agent, err := client.New(asServiceAccount(agentUser, "host-a"), client.Options{Scheme: scheme})
	if err != nil {
		return err
	}
	probes := map[string]func() error{
		"xenferry-node-agent-xenhosts": func() error {
			return agent.Status().Patch(ctx, probeHost.DeepCopy(), client.RawPatch(types.MergePatchType, []byte(`{"status":{"backend":"probe"}}`)))
		},
		"xenferry-node-agent-xendomains": func() error {
			return agent.Status().Patch(ctx, probeDom.DeepCopy(), client.RawPatch(types.MergePatchType, []byte(`{"status":{"host":"elsewhere"}}`)))
		},
		"xenferry-node-agent-vmmigrations": func() error {
			return agent.Status().Patch(ctx, probeMig.DeepCopy(), client.RawPatch(types.MergePatchType, []byte(`{"status":{"phase":"Failed"}}`)))
		},
	}
	for policy, probe := range probes {
		for {
			err := probe()
			if apierrors.IsForbidden(err) && strings.Contains(err.Error(), policy) {
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("policy %s not in force after waiting; last answer: %v", policy, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}

// asServiceAccount is the admin's config impersonating a ServiceAccount,
// with the groups a real token carries and, when node is set, the node-name
// extra of a token bound to a pod on that node.
func asServiceAccount(user, node string) *rest.Config {
	c := rest.CopyConfig(restCfg)
	ns := strings.Split(user, ":")[2]
	c.Impersonate = rest.ImpersonationConfig{
		UserName: user,
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
	}
	if node != "" {
		c.Impersonate.Extra = map[string][]string{nodeNameExtra: {node}}
	}
	return c
}

func clientAs(t *testing.T, user, node string) client.WithWatch {
	t.Helper()
	c, err := client.NewWithWatch(asServiceAccount(user, node), client.Options{Scheme: scheme})
	if err != nil {
		t.Fatalf("client as %s on %q: %v", user, node, err)
	}
	return c
}

// Who refused: RBAC names the verb the user "cannot" use; a policy names
// itself.
const byRBAC = "cannot"

func wantForbidden(t *testing.T, err error, by string) {
	t.Helper()
	if err == nil {
		t.Fatalf("allowed; want forbidden (by %q)", by)
	}
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), by) {
		t.Fatalf("got %v; want forbidden by %q", err, by)
	}
	// A policy whose expression fails also denies (failurePolicy Fail), but
	// by accident: every refusal here must come from a rule that decided.
	if strings.Contains(err.Error(), "resulted in error") {
		t.Fatalf("refused by an expression that failed to evaluate: %v", err)
	}
	t.Log(err)
}

func wantAllowed(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("refused: %v", err)
	}
}
