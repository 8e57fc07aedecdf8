package controllers

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// The markers in rbac.go spell out CASecretName and LeaderElectionID; the
// generated Role must grant exactly those names, or the controller is
// refused its own CA Secret and Lease.
func TestGeneratedRoleNamesTheCASecretAndTheLease(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var role *rbacv1.Role
	for _, doc := range strings.Split(string(raw), "\n---") {
		var r rbacv1.Role
		if err := yaml.Unmarshal([]byte(doc), &r); err != nil {
			t.Fatalf("role.yaml: %v", err)
		}
		if r.Kind == "Role" && r.Name == "xenferry-controller" {
			role = &r
		}
	}
	if role == nil {
		t.Fatal("config/rbac/role.yaml has no Role xenferry-controller: run make manifests")
	}
	for _, want := range []struct{ resource, name string }{{"secrets", CASecretName}, {"leases", LeaderElectionID}} {
		found := false
		for _, rule := range role.Rules {
			if slices.Contains(rule.Resources, want.resource) && slices.Contains(rule.ResourceNames, want.name) &&
				slices.Contains(rule.Verbs, "get") && slices.Contains(rule.Verbs, "update") {
				found = true
			}
		}
		if !found {
			t.Errorf("the Role grants no get/update of %s %q: the markers in rbac.go and the constant differ, or make manifests was not run", want.resource, want.name)
		}
	}
}
