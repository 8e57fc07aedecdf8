package rbac

import (
	"context"
	"encoding/json"
	"testing"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/controllers"
)

const (
	vmmPolicy = "xenferry-node-agent-vmmigrations"
	hostPol   = "xenferry-node-agent-xenhosts"
	domPolicy = "xenferry-node-agent-xendomains"
)

func mergePatch(s string) client.Patch { return client.RawPatch(types.MergePatchType, []byte(s)) }

// jsonPatch is what the agent sends for its half (node-agent writeHalf).
func jsonPatch(t *testing.T, ops ...map[string]any) client.Patch {
	t.Helper()
	b, err := json.Marshal(ops)
	if err != nil {
		t.Fatal(err)
	}
	return client.RawPatch(types.JSONPatchType, b)
}

func op(o, path string, value any) map[string]any {
	m := map[string]any{"op": o, "path": path}
	if value != nil {
		m["value"] = value
	}
	return m
}

func TestAgentCannotReadSecrets(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	mustCreate(t, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "agent-secret"}, StringData: map[string]string{"k": "v"}})
	mustCreate(t, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: operatorNS, Name: controllers.CASecretName + "-agent"}, StringData: map[string]string{"k": "v"}})
	for _, node := range []string{"host-a", ""} {
		agent := clientAs(t, agentUser, node)
		cases := []struct {
			name string
			err  func() error
		}{
			{"get a Secret in a tenant namespace", func() error {
				return agent.Get(ctx, client.ObjectKey{Namespace: tenantNS, Name: "agent-secret"}, &corev1.Secret{})
			}},
			{"list Secrets in a tenant namespace", func() error { return agent.List(ctx, &corev1.SecretList{}, client.InNamespace(tenantNS)) }},
			{"list Secrets in all namespaces", func() error { return agent.List(ctx, &corev1.SecretList{}) }},
			{"get a Secret in the operator namespace", func() error {
				return agent.Get(ctx, client.ObjectKey{Namespace: operatorNS, Name: controllers.CASecretName + "-agent"}, &corev1.Secret{})
			}},
			{"get the CA Secret", func() error {
				return agent.Get(ctx, client.ObjectKey{Namespace: operatorNS, Name: controllers.CASecretName}, &corev1.Secret{})
			}},
			{"create a Secret", func() error {
				return agent.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "by-agent"}})
			}},
		}
		for _, c := range cases {
			t.Run("agent on "+node+" may not "+c.name, func(t *testing.T) { wantForbidden(t, c.err(), byRBAC) })
		}
	}
}

func TestControllerSecretsOnlyInItsNamespaceByName(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	mustCreate(t, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "ctl-tenant-secret"}, StringData: map[string]string{"k": "v"}})
	mustCreate(t, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: operatorNS, Name: "ctl-other-secret"}, StringData: map[string]string{"k": "v"}})
	ctl := clientAs(t, controllerUsr, "")

	ca := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: operatorNS, Name: controllers.CASecretName}, StringData: map[string]string{"ca.crt": "x"}}
	t.Run("controller may create the CA Secret in its namespace", func(t *testing.T) { wantAllowed(t, ctl.Create(ctx, ca)) })
	t.Run("controller may get the CA Secret", func(t *testing.T) {
		wantAllowed(t, ctl.Get(ctx, client.ObjectKeyFromObject(ca), &corev1.Secret{}))
	})
	t.Run("controller may update the CA Secret (rotation)", func(t *testing.T) {
		got := &corev1.Secret{}
		wantAllowed(t, ctl.Get(ctx, client.ObjectKeyFromObject(ca), got))
		got.Data["ca.crt"] = []byte("y")
		wantAllowed(t, ctl.Update(ctx, got))
	})

	denied := []struct {
		name string
		err  func() error
	}{
		{"get a Secret in a tenant namespace", func() error {
			return ctl.Get(ctx, client.ObjectKey{Namespace: tenantNS, Name: "ctl-tenant-secret"}, &corev1.Secret{})
		}},
		{"list Secrets in a tenant namespace", func() error { return ctl.List(ctx, &corev1.SecretList{}, client.InNamespace(tenantNS)) }},
		{"list Secrets in all namespaces", func() error { return ctl.List(ctx, &corev1.SecretList{}) }},
		{"create a Secret in a tenant namespace", func() error {
			return ctl.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "by-controller"}})
		}},
		{"get another Secret in its namespace", func() error {
			return ctl.Get(ctx, client.ObjectKey{Namespace: operatorNS, Name: "ctl-other-secret"}, &corev1.Secret{})
		}},
		{"list Secrets in its namespace", func() error { return ctl.List(ctx, &corev1.SecretList{}, client.InNamespace(operatorNS)) }},
		{"watch Secrets in its namespace", func() error {
			w, err := ctl.Watch(ctx, &corev1.SecretList{}, client.InNamespace(operatorNS))
			if err == nil {
				w.Stop()
			}
			return err
		}},
		{"delete the CA Secret", func() error { return ctl.Delete(ctx, ca.DeepCopy()) }},
		{"update another Secret in its namespace", func() error {
			return ctl.Patch(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: operatorNS, Name: "ctl-other-secret"}}, mergePatch(`{"stringData":{"k":"w"}}`))
		}},
	}
	for _, c := range denied {
		t.Run("controller may not "+c.name, func(t *testing.T) { wantForbidden(t, c.err(), byRBAC) })
	}
}

func TestControllerLeaderElectionLeaseByName(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	ctl := clientAs(t, controllerUsr, "")
	lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: operatorNS, Name: controllers.LeaderElectionID}}
	wantAllowed(t, ctl.Create(ctx, lease))
	wantAllowed(t, ctl.Get(ctx, client.ObjectKeyFromObject(lease), lease))
	holder := "controller-0"
	lease.Spec.HolderIdentity = &holder
	wantAllowed(t, ctl.Update(ctx, lease))
	mustCreate(t, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: operatorNS, Name: "someone-elses-lease"}})
	wantForbidden(t, ctl.Get(ctx, client.ObjectKey{Namespace: operatorNS, Name: "someone-elses-lease"}, &coordinationv1.Lease{}), byRBAC)
	wantForbidden(t, ctl.Get(ctx, client.ObjectKey{Namespace: tenantNS, Name: controllers.LeaderElectionID}, &coordinationv1.Lease{}), byRBAC)
}

// migration creates a VMMigration between host-a (source) and host-b
// (target) whose status the controller has filled in; with halves, the
// agents have written theirs too.
func migration(t *testing.T, name string, halves bool) *v1.VMMigration {
	t.Helper()
	ctx := context.Background()
	m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: name}, Spec: v1.VMMigrationSpec{Domain: "web"}}
	mustCreate(t, m)
	m.Status = v1.VMMigrationStatus{
		Phase: v1.MigrationPreCopy, SourceHost: "host-a", TargetHost: "host-b", DomainMemoryBytes: 1 << 30,
		Source: &v1.SourceState{Host: "host-a", Phase: "Precopy"},
		Target: &v1.TargetState{Host: "host-b", Address: "10.0.0.2:7070", Ready: true, Prepared: true},
	}
	if !halves {
		m.Status.Source, m.Status.Target = nil, nil
	}
	// The controller writes the shared fields (it is not bound by the policy).
	ctl := clientAs(t, controllerUsr, "")
	if err := ctl.Status().Update(ctx, m); err != nil {
		t.Fatalf("controller writes the status of VMMigration %s: %v", name, err)
	}
	return m
}

func TestAgentWritesOnlyItsHalfOfItsMigrations(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	src, dst := clientAs(t, agentUser, "host-a"), clientAs(t, agentUser, "host-b")
	other, anonymous := clientAs(t, agentUser, "host-c"), clientAs(t, agentUser, "")
	t.Run("each agent writes the first version of its half", func(t *testing.T) {
		first := migration(t, "mig-first", false)
		wantAllowed(t, dst.Status().Patch(ctx, first.DeepCopy(), jsonPatch(t, op("add", "/status/target", v1.TargetState{Host: "host-b", Address: "10.0.0.2:7070", Ready: true}))))
		wantAllowed(t, src.Status().Patch(ctx, first.DeepCopy(), jsonPatch(t, op("add", "/status/source", v1.SourceState{Host: "host-a", Phase: "Precopy"}))))
	})
	m := migration(t, "mig-halves", true)
	key := m.DeepCopy

	srcHalf := v1.SourceState{Host: "host-a", Phase: "StopAndCopy", Message: "stopping"}
	dstHalf := v1.TargetState{Host: "host-b", Address: "10.0.0.2:7070", Ready: true, Prepared: true, Resumed: true}
	cases := []struct {
		name  string
		c     client.Client
		patch client.Patch
		by    string // "" when allowed
	}{
		{"the source agent writes status.source", src, jsonPatch(t, op("add", "/status/source", srcHalf)), ""},
		{"the target agent writes status.target", dst, jsonPatch(t, op("add", "/status/target", dstHalf)), ""},
		{"the source agent rewrites status.target.address", src, jsonPatch(t, op("replace", "/status/target/address", "192.0.2.66:7070")), vmmPolicy},
		{"the source agent replaces status.target", src, jsonPatch(t, op("add", "/status/target", v1.TargetState{Host: "host-b", Address: "192.0.2.66:7070", Ready: true})), vmmPolicy},
		{"the source agent removes status.target", src, jsonPatch(t, op("remove", "/status/target", nil)), vmmPolicy},
		{"the source agent sets status.phase", src, mergePatch(`{"status":{"phase":"Succeeded"}}`), vmmPolicy},
		{"the source agent sets its half and status.phase together", src,
			jsonPatch(t, op("add", "/status/source", srcHalf), op("replace", "/status/phase", "Succeeded")), vmmPolicy},
		{"the source agent moves status.targetHost", src, mergePatch(`{"status":{"targetHost":"host-c"}}`), vmmPolicy},
		{"the source agent adds a field the controller owns", src, mergePatch(`{"status":{"failureReason":"x"}}`), vmmPolicy},
		{"the source agent names another host in its half", src, jsonPatch(t, op("add", "/status/source", v1.SourceState{Host: "host-c"})), vmmPolicy},
		{"the target agent writes status.source", dst, jsonPatch(t, op("add", "/status/source", v1.SourceState{Host: "host-b", Completed: true})), vmmPolicy},
		{"the target agent sets status.target.completed and status.source.completed", dst, mergePatch(`{"status":{"target":{"completed":true},"source":{"completed":true}}}`), vmmPolicy},
		{"an agent on neither host writes status.source", other, jsonPatch(t, op("add", "/status/source", v1.SourceState{Host: "host-c"})), vmmPolicy},
		{"an agent on neither host writes status.target", other, jsonPatch(t, op("add", "/status/target", v1.TargetState{Host: "host-c"})), vmmPolicy},
		{"the source agent without a pod-bound token writes status.source", anonymous, jsonPatch(t, op("add", "/status/source", srcHalf)), vmmPolicy},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := &v1.VMMigration{}
			if err := admin.Get(ctx, client.ObjectKeyFromObject(m), before); err != nil {
				t.Fatal(err)
			}
			err := c.c.Status().Patch(ctx, key(), c.patch)
			if c.by == "" {
				wantAllowed(t, err)
				return
			}
			wantForbidden(t, err, c.by)
			after := &v1.VMMigration{}
			if err := admin.Get(ctx, client.ObjectKeyFromObject(m), after); err != nil {
				t.Fatal(err)
			}
			if after.ResourceVersion != before.ResourceVersion {
				t.Fatalf("a refused write changed the migration (resourceVersion %s -> %s)", before.ResourceVersion, after.ResourceVersion)
			}
		})
	}
	got := &v1.VMMigration{}
	if err := admin.Get(ctx, client.ObjectKeyFromObject(m), got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Source == nil || got.Status.Source.Phase != "StopAndCopy" || got.Status.Target == nil || !got.Status.Target.Resumed ||
		got.Status.Target.Address != "10.0.0.2:7070" || got.Status.Phase != v1.MigrationPreCopy || got.Status.TargetHost != "host-b" {
		t.Fatalf("status after the writes: source %+v target %+v phase %s targetHost %s", got.Status.Source, got.Status.Target, got.Status.Phase, got.Status.TargetHost)
	}

	t.Run("an agent may not change a migration's spec", func(t *testing.T) {
		wantForbidden(t, src.Patch(ctx, key(), mergePatch(`{"spec":{"cancel":true}}`)), byRBAC)
	})
	t.Run("an agent may not create a migration", func(t *testing.T) {
		wantForbidden(t, src.Create(ctx, &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "by-agent"}, Spec: v1.VMMigrationSpec{Domain: "web"}}), byRBAC)
	})
	t.Run("an agent may not delete a migration", func(t *testing.T) { wantForbidden(t, src.Delete(ctx, key()), byRBAC) })
	t.Run("the controller may still set status.phase", func(t *testing.T) {
		wantAllowed(t, clientAs(t, controllerUsr, "").Status().Patch(ctx, key(), mergePatch(`{"status":{"phase":"StopAndCopy"}}`)))
	})
}

func TestAgentWritesOnlyItsOwnXenHost(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	a, anonymous := clientAs(t, agentUser, "host-a"), clientAs(t, agentUser, "")
	mustCreate(t, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-b"}})

	t.Run("the agent on host-a registers XenHost host-a", func(t *testing.T) {
		wantAllowed(t, a.Create(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-a"}}))
	})
	t.Run("the agent on host-a heartbeats XenHost host-a", func(t *testing.T) {
		wantAllowed(t, a.Status().Patch(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-a"}},
			mergePatch(`{"status":{"backend":"sim","dataAddress":"10.0.0.1:7070"}}`)))
	})
	cases := []struct {
		name string
		err  func() error
		by   string
	}{
		{"the agent on host-a writes the status of XenHost host-b", func() error {
			return a.Status().Patch(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-b"}}, mergePatch(`{"status":{"dataAddress":"192.0.2.66:7070"}}`))
		}, hostPol},
		{"the agent on host-a registers XenHost host-z", func() error {
			return a.Create(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-z"}})
		}, hostPol},
		{"the agent on host-a uncordons its own XenHost", func() error {
			return a.Patch(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-a"}}, mergePatch(`{"spec":{"unschedulable":false}}`))
		}, byRBAC},
		{"the agent on host-a deletes XenHost host-b", func() error {
			return a.Delete(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-b"}})
		}, byRBAC},
		{"an agent without a pod-bound token registers a XenHost", func() error {
			return anonymous.Create(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-y"}})
		}, hostPol},
		{"an agent without a pod-bound token heartbeats XenHost host-a", func() error {
			return anonymous.Status().Patch(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: "host-a"}}, mergePatch(`{"status":{"backend":"sim"}}`))
		}, hostPol},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { wantForbidden(t, c.err(), c.by) })
	}
}

func TestAgentWritesOnlyXenDomainsOfItsNode(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	a, b, anonymous := clientAs(t, agentUser, "host-a"), clientAs(t, agentUser, "host-b"), clientAs(t, agentUser, "")
	// web-b runs on host-b.
	onB := &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "web-b"}, Spec: v1.XenDomainSpec{DomainName: "web-b", MemoryBytes: 1 << 30}}
	mustCreate(t, onB)
	wantAllowed(t, b.Status().Patch(ctx, onB.DeepCopy(), mergePatch(`{"status":{"host":"host-b","state":"Running","domID":3}}`)))
	ref := func(name string) *v1.XenDomain {
		return &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: name}}
	}

	t.Run("the agent on host-a publishes a domain of its own", func(t *testing.T) {
		wantAllowed(t, a.Create(ctx, &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "web-a"}, Spec: v1.XenDomainSpec{DomainName: "web-a"}}))
		wantAllowed(t, a.Status().Patch(ctx, ref("web-a"), mergePatch(`{"status":{"host":"host-a","state":"Running","domID":1}}`)))
		wantAllowed(t, a.Patch(ctx, ref("web-a"), mergePatch(`{"spec":{"memoryBytes":2147483648}}`)))
	})
	cases := []struct {
		name string
		err  func() error
	}{
		{"the agent on host-a changes the spec of a domain on host-b", func() error {
			return a.Patch(ctx, ref("web-b"), mergePatch(`{"spec":{"disks":[{"id":"xvda","path":"/dev/sda"}]}}`))
		}},
		{"the agent on host-a writes a status of a domain on host-b that keeps host-b", func() error {
			return a.Status().Patch(ctx, ref("web-b"), mergePatch(`{"status":{"state":"Shutdown"}}`))
		}},
		{"the agent on host-a deletes a domain on host-b", func() error { return a.Delete(ctx, ref("web-b")) }},
		{"the agent on host-a writes a status naming host-c", func() error {
			return a.Status().Patch(ctx, ref("web-a"), mergePatch(`{"status":{"host":"host-c"}}`))
		}},
		{"an agent without a pod-bound token publishes a domain", func() error {
			return anonymous.Create(ctx, &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: tenantNS, Name: "web-x"}, Spec: v1.XenDomainSpec{DomainName: "web-x"}})
		}},
		{"an agent without a pod-bound token writes the status of a domain", func() error {
			return anonymous.Status().Patch(ctx, ref("web-a"), mergePatch(`{"status":{"state":"Paused"}}`))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { wantForbidden(t, c.err(), domPolicy) })
	}
	t.Run("the agent on host-b keeps its domain's spec current", func(t *testing.T) {
		wantAllowed(t, b.Patch(ctx, ref("web-b"), mergePatch(`{"spec":{"vcpus":2}}`)))
	})
	t.Run("the agent on host-a deletes its domain that is gone", func(t *testing.T) {
		wantAllowed(t, a.Delete(ctx, ref("web-a")))
	})
	// The known gap (config/policy/node_agent_policy.yaml): a takeover, the
	// status write by which the target claims a domain that just arrived,
	// cannot be tied to the migration by a policy that sees one object.
	t.Run("the agent on host-a takes over a domain on host-b (known gap: not tied to a migration)", func(t *testing.T) {
		wantAllowed(t, a.Status().Patch(ctx, ref("web-b"), mergePatch(`{"status":{"host":"host-a","state":"Running","domID":7}}`)))
	})
}

func mustCreate(t *testing.T, o client.Object) {
	t.Helper()
	if err := admin.Create(context.Background(), o); err != nil {
		t.Fatalf("create %T %s: %v", o, client.ObjectKeyFromObject(o), err)
	}
}
