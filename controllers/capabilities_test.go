package controllers

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

func capHost(name string, c *v1.HostCapabilities) *v1.XenHost {
	h := &v1.XenHost{}
	h.Name = name
	h.Status.Capabilities = c
	return h
}

func TestResolveCapabilities(t *testing.T) {
	engine := &v1.HostCapabilities{Transport: "engine", Strategies: []v1.MigrationStrategy{v1.StrategyPreCopy, v1.StrategyPostCopy, v1.StrategyHybrid}, Dedup: true, EarlyResume: true}
	xl := &v1.HostCapabilities{Transport: "xl", Strategies: []v1.MigrationStrategy{v1.StrategyPreCopy}, Dedup: true}
	xlNoDedup := &v1.HostCapabilities{Transport: "xl", Strategies: []v1.MigrationStrategy{v1.StrategyPreCopy}}
	cases := []struct {
		name       string
		engine     string // resolved from the spec
		requested  v1.MigrationStrategy
		hosts      []*v1.XenHost
		want       string // engine strategy after capabilities
		wantNote   string
		wantRefuse string
	}{
		{"engine hosts keep hybrid", "hybrid+dedup", "", []*v1.XenHost{capHost("a", engine), capHost("b", engine)}, "hybrid+dedup", "", ""},
		{"hosts without capabilities are engine hosts", "postcopy", v1.StrategyPostCopy, []*v1.XenHost{capHost("a", nil), capHost("b", nil)}, "postcopy", "", ""},
		{"default hybrid between xl hosts is pre-copy with dedup", "hybrid+dedup", "", []*v1.XenHost{capHost("a", xl), capHost("b", xl)}, "precopy+dedup", "Hybrid runs as PreCopy: host a, b (transport xl) cannot resume early", ""},
		{"pre-copy allowing post-copy between xl hosts is plain pre-copy", "hybrid", v1.StrategyPreCopy, []*v1.XenHost{capHost("a", xl)}, "precopy", "PreCopy runs as PreCopy", ""},
		{"plain pre-copy between xl hosts is unchanged", "precopy+dedup", v1.StrategyPreCopy, []*v1.XenHost{capHost("a", xl), capHost("b", xl)}, "precopy+dedup", "", ""},
		{"post-copy between xl hosts is refused", "postcopy", v1.StrategyPostCopy, []*v1.XenHost{capHost("a", xl), capHost("b", xl)}, "", "", "strategy PostCopy needs early resume, which host a, b (transport xl) cannot do; use strategy PreCopy or Hybrid"},
		{"dedup dropped where a host cannot resolve references", "precopy+dedup", v1.StrategyPreCopy, []*v1.XenHost{capHost("a", xl), capHost("b", xlNoDedup)}, "precopy", "without disk dedup: host b cannot resolve disk references", ""},
		{"different transports are refused", "precopy", v1.StrategyPreCopy, []*v1.XenHost{capHost("a", engine), capHost("b", xl)}, "", "", `host b migrates through transport "xl" but a through "engine"`},
		{"a host with no strategy is refused", "precopy", v1.StrategyPreCopy, []*v1.XenHost{capHost("a", &v1.HostCapabilities{Transport: "xl"})}, "", "", "cannot run any migration strategy"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := v1.ResolvedParameters{EngineStrategy: c.engine, AllowPostCopy: true, SwitchToPostCopyAfter: metav1.Duration{Duration: time.Minute}}
			note, refusal := resolveCapabilities(&p, c.requested, c.hosts...)
			if c.wantRefuse != "" {
				if !strings.Contains(refusal, c.wantRefuse) {
					t.Fatalf("refusal %q, want it to contain %q", refusal, c.wantRefuse)
				}
				return
			}
			if refusal != "" {
				t.Fatalf("refused: %s", refusal)
			}
			if p.EngineStrategy != c.want {
				t.Errorf("engine strategy %q, want %q", p.EngineStrategy, c.want)
			}
			if !strings.Contains(note, c.wantNote) || (c.wantNote == "") != (note == "") {
				t.Errorf("note %q, want %q", note, c.wantNote)
			}
			if strings.HasPrefix(c.want, "precopy") && (p.AllowPostCopy || p.SwitchToPostCopyAfter.Duration != 0) && strings.HasPrefix(c.engine, "hybrid") {
				t.Errorf("narrowed to pre-copy but post-copy still allowed: %+v", p)
			}
			// Resolving twice changes nothing more: the controller applies
			// it again once the target is chosen.
			again := p
			if _, r2 := resolveCapabilities(&again, c.requested, c.hosts...); r2 != "" || again != p {
				t.Errorf("second resolution changed %+v into %+v (refusal %q)", p, again, r2)
			}
		})
	}
}

func TestResolveCapabilitiesCompressesOnlyWhatEveryHostDecodes(t *testing.T) {
	zstd := &v1.HostCapabilities{Transport: "xl", Strategies: []v1.MigrationStrategy{v1.StrategyPreCopy}, Dedup: true,
		Compression: []v1.PageCodec{v1.PageCodecZstd}}
	plain := &v1.HostCapabilities{Transport: "xl", Strategies: []v1.MigrationStrategy{v1.StrategyPreCopy}, Dedup: true}
	for _, c := range []struct {
		name  string
		mode  v1.CompressionMode
		hosts []*v1.XenHost
		want  v1.PageCodec
	}{
		{"both decode zstd", v1.CompressionAuto, []*v1.XenHost{capHost("a", zstd), capHost("b", zstd)}, v1.PageCodecZstd},
		{"both decode zstd, always", v1.CompressionAlways, []*v1.XenHost{capHost("a", zstd), capHost("b", zstd)}, v1.PageCodecZstd},
		{"both decode zstd, but never", v1.CompressionNever, []*v1.XenHost{capHost("a", zstd), capHost("b", zstd)}, ""},
		{"a migration resolved before modes existed", "", []*v1.XenHost{capHost("a", zstd), capHost("b", zstd)}, v1.PageCodecZstd},
		{"the target predates compression", v1.CompressionAuto, []*v1.XenHost{capHost("a", zstd), capHost("b", plain)}, ""},
		{"the source predates compression", v1.CompressionAlways, []*v1.XenHost{capHost("a", plain), capHost("b", zstd)}, ""},
		{"hosts predate capabilities", v1.CompressionAuto, []*v1.XenHost{capHost("a", nil), capHost("b", nil)}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A stale value from an earlier resolution does not survive.
			p := v1.ResolvedParameters{EngineStrategy: "precopy+dedup", Compression: v1.PageCodecZstd, CompressionMode: c.mode}
			if _, refusal := resolveCapabilities(&p, v1.StrategyPreCopy, c.hosts...); refusal != "" {
				t.Fatalf("refused: %s", refusal)
			}
			if p.Compression != c.want {
				t.Fatalf("compression %q, want %q", p.Compression, c.want)
			}
		})
	}
}
