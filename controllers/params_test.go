package controllers

import (
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

func dur(d time.Duration) *metav1.Duration { return &metav1.Duration{Duration: d} }
func boolp(b bool) *bool                   { return &b }

func TestResolveParameters(t *testing.T) {
	bw := resource.MustParse("100Mi")
	pbw := resource.MustParse("10Mi")
	policy := &v1.MigrationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p"}, Spec: v1.MigrationPolicySpec{
		MigrationParameters: v1.MigrationParameters{Bandwidth: &pbw, MaxDowntime: dur(50 * time.Millisecond), CompletionTimeoutPerGiB: dur(60 * time.Second),
			Compression: compressionp(v1.CompressionAlways)},
	}}
	cases := []struct {
		name   string
		spec   v1.VMMigrationSpec
		policy *v1.MigrationPolicy
		mem    int64
		check  func(t *testing.T, p v1.ResolvedParameters)
	}{
		{"an empty spec gets hybrid with dedup and the defaults", v1.VMMigrationSpec{}, nil, 2 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.EngineStrategy != "hybrid+dedup" || !p.AllowPostCopy || p.MaxDowntime.Duration != 300*time.Millisecond || p.CompletionTimeout.Duration != 300*time.Second {
				t.Fatalf("%+v", p)
			}
			if p.SwitchToPostCopyAfter.Duration != 0 {
				t.Fatalf("no completion timeout was configured, but the data path is told to switch after %s", p.SwitchToPostCopyAfter.Duration)
			}
			if p.CompressionMode != v1.CompressionAuto {
				t.Fatalf("compression mode %q, want Auto by default", p.CompressionMode)
			}
		}},
		{"pre-copy forbids post-copy unless allowed", v1.VMMigrationSpec{Strategy: v1.StrategyPreCopy}, nil, 1 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.EngineStrategy != "precopy+dedup" || p.AllowPostCopy {
				t.Fatalf("%+v", p)
			}
		}},
		{"pre-copy with post-copy allowed runs the hybrid engine", v1.VMMigrationSpec{Strategy: v1.StrategyPreCopy, MigrationParameters: v1.MigrationParameters{AllowPostCopy: boolp(true)}}, nil, 1 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.EngineStrategy != "hybrid+dedup" || !p.AllowPostCopy {
				t.Fatalf("%+v", p)
			}
		}},
		{"post-copy has no dedup variant", v1.VMMigrationSpec{Strategy: v1.StrategyPostCopy}, nil, 1 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.EngineStrategy != "postcopy" {
				t.Fatalf("%+v", p)
			}
		}},
		{"dedup can be turned off", v1.VMMigrationSpec{Dedup: boolp(false)}, nil, 1 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.EngineStrategy != "hybrid" {
				t.Fatalf("%+v", p)
			}
		}},
		{"the policy fills what the spec leaves out", v1.VMMigrationSpec{}, policy, 1 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.Policy != "p" || p.BandwidthBytesPerSecond != 10<<20 || p.MaxDowntime.Duration != 50*time.Millisecond || p.CompletionTimeout.Duration != 60*time.Second {
				t.Fatalf("%+v", p)
			}
			if p.SwitchToPostCopyAfter.Duration != 60*time.Second {
				t.Fatalf("a configured completion timeout with post-copy allowed must reach the data path: %+v", p)
			}
			if p.CompressionMode != v1.CompressionAlways {
				t.Fatalf("compression mode %q, want the policy's Always", p.CompressionMode)
			}
		}},
		{"the spec overrides the policy", v1.VMMigrationSpec{MigrationParameters: v1.MigrationParameters{Bandwidth: &bw, MaxDowntime: dur(time.Second),
			Compression: compressionp(v1.CompressionNever)}}, policy, 1 << 30, func(t *testing.T, p v1.ResolvedParameters) {
			if p.BandwidthBytesPerSecond != 100<<20 || p.MaxDowntime.Duration != time.Second || p.CompressionMode != v1.CompressionNever {
				t.Fatalf("%+v", p)
			}
		}},
		{"a tiny domain still gets the minimum completion timeout", v1.VMMigrationSpec{}, nil, 4096, func(t *testing.T, p v1.ResolvedParameters) {
			if p.CompletionTimeout.Duration != DefaultDefaults.MinCompletionTimeout {
				t.Fatalf("%+v", p)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.check(t, resolveParameters(&c.spec, c.policy, c.mem, DefaultDefaults))
		})
	}
}

func TestSelectPolicy(t *testing.T) {
	pol := func(name string, ns, dom map[string]string) v1.MigrationPolicy {
		p := v1.MigrationPolicy{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if ns != nil {
			p.Spec.Selectors.NamespaceSelector = &metav1.LabelSelector{MatchLabels: ns}
		}
		if dom != nil {
			p.Spec.Selectors.DomainSelector = &metav1.LabelSelector{MatchLabels: dom}
		}
		return p
	}
	all := []v1.MigrationPolicy{
		pol("z-catch-all", nil, nil),
		pol("web", nil, map[string]string{"app": "web"}),
		pol("web-prod", map[string]string{"env": "prod"}, map[string]string{"app": "web"}),
		pol("b-tie", nil, map[string]string{"tier": "front"}),
		pol("a-tie", nil, map[string]string{"tier": "front"}),
	}
	cases := []struct {
		name    string
		ns, dom map[string]string
		want    string
	}{
		{"nothing specific matches: the catch-all applies", nil, map[string]string{"app": "db"}, "z-catch-all"},
		{"a domain selector beats the catch-all", nil, map[string]string{"app": "web"}, "web"},
		{"namespace and domain selectors beat a domain selector", map[string]string{"env": "prod"}, map[string]string{"app": "web"}, "web-prod"},
		{"equally specific policies tie to the first name", nil, map[string]string{"tier": "front"}, "a-tie"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, errs := selectPolicy(all, c.ns, c.dom)
			if len(errs) > 0 || got == nil || got.Name != c.want {
				t.Fatalf("got %v (errors %v), want %s", got, errs, c.want)
			}
		})
	}
}

func TestChooseTarget(t *testing.T) {
	now := time.Now()
	fresh := &metav1.Time{Time: now}
	stale := &metav1.Time{Time: now.Add(-time.Hour)}
	host := func(name string, free int64, hb *metav1.Time, mut ...func(*v1.XenHost)) v1.XenHost {
		h := v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: v1.XenHostStatus{Backend: "sim", Version: "1.0", CapacityBytes: 8 << 30, FreeBytes: free, HeartbeatTime: hb}}
		for _, f := range mut {
			f(&h)
		}
		return h
	}
	src := host("src", 8<<30, fresh)
	lim := Limits{Cluster: 10, OutboundPerHost: 10, InboundPerHost: 1}
	cases := []struct {
		name  string
		hosts []v1.XenHost
		load  load
		want  string
		why   string
	}{
		{"the host with the most free memory wins", []v1.XenHost{src, host("a", 2<<30, fresh), host("b", 4<<30, fresh)}, load{}, "b", ""},
		{"reserved inbound memory counts against a host", []v1.XenHost{src, host("a", 3<<30, fresh), host("b", 4<<30, fresh)},
			load{inbound: map[string]int{}, inboundMemory: map[string]int64{"b": 2 << 30}}, "a", ""},
		{"cordoned, stale and incompatible hosts are skipped", []v1.XenHost{src,
			host("cordoned", 8<<30, fresh, func(h *v1.XenHost) { h.Spec.Unschedulable = true }),
			host("stale", 8<<30, stale),
			host("xen", 8<<30, fresh, func(h *v1.XenHost) { h.Status.Backend = "xen" }),
			host("ok", 1<<30, fresh)}, load{}, "ok", ""},
		{"a host at its inbound limit is skipped", []v1.XenHost{src, host("busy", 8<<30, fresh), host("idle", 2<<30, fresh)},
			load{inbound: map[string]int{"busy": 1}}, "idle", ""},
		{"no host fits: the reason names each one", []v1.XenHost{src, host("small", 100<<20, fresh)}, load{}, "", "small: not enough free memory"},
		{"the source alone: no other host", []v1.XenHost{src}, load{}, "", "no other XenHost exists"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.load.inbound == nil {
				c.load.inbound = map[string]int{}
			}
			if c.load.inboundMemory == nil {
				c.load.inboundMemory = map[string]int64{}
			}
			got, why := chooseTarget(c.hosts, &src, 512<<20, c.load, lim, now, time.Minute, nil)
			name := ""
			if got != nil {
				name = got.Name
			}
			if name != c.want || (c.why != "" && !contains(why, c.why)) {
				t.Fatalf("got %q (%s), want %q (%s)", name, why, c.want, c.why)
			}
		})
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func TestComputeLoadCountsOnlySlotHolders(t *testing.T) {
	mk := func(uid string, phase v1.VMMigrationPhase, src, dst string) v1.VMMigration {
		m := v1.VMMigration{}
		m.UID = typesUID(uid)
		m.Status = v1.VMMigrationStatus{Phase: phase, SourceHost: src, TargetHost: dst, DomainMemoryBytes: 1 << 30}
		return m
	}
	l := computeLoad([]v1.VMMigration{
		mk("1", v1.MigrationPreCopy, "a", "b"),
		mk("2", v1.MigrationScheduling, "a", ""),
		mk("3", v1.MigrationSucceeded, "a", "b"),
		mk("4", v1.MigrationTargetReady, "c", "b"),
		mk("self", v1.MigrationPreCopy, "a", "b"),
	}, "self")
	if l.total != 2 || l.outbound["a"] != 1 || l.inbound["b"] != 2 || l.inboundMemory["b"] != 2<<30 {
		t.Fatalf("load %+v", l)
	}
}

func typesUID(s string) types.UID { return types.UID(s) }

func compressionp(m v1.CompressionMode) *v1.CompressionMode { return &m }
