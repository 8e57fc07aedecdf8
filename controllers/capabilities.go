package controllers

import (
	"fmt"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// legacyCapabilities stand for a host whose agent predates capabilities:
// such agents ran only xenferry's engine, with every strategy.
var legacyCapabilities = v1.HostCapabilities{
	Transport:   "engine",
	Strategies:  []v1.MigrationStrategy{v1.StrategyPreCopy, v1.StrategyPostCopy, v1.StrategyHybrid},
	Dedup:       true,
	EarlyResume: true,
}

func capabilitiesOf(h *v1.XenHost) v1.HostCapabilities {
	if h.Status.Capabilities == nil {
		return legacyCapabilities
	}
	return *h.Status.Capabilities
}

// resolveCapabilities narrows the parameters resolved from the spec to what
// every one of hosts can carry. It returns a note saying what it changed
// ("" if nothing), or, when the spec cannot be honoured at all, refusal
// saying why and what to do.
//
// The rules, in order: the hosts must share a transport; PostCopy needs
// early resume on every host; Hybrid, and PreCopy with post-copy allowed,
// fall back to plain pre-copy without it (the spec allows pre-copy only, it
// does not demand the switch); dedup is dropped where a host cannot
// resolve references; page batches may be compressed with a codec every
// host decodes, unless compressionMode is Never. Pure: it reads nothing
// but its arguments.
func resolveCapabilities(p *v1.ResolvedParameters, requested v1.MigrationStrategy, hosts ...*v1.XenHost) (note, refusal string) {
	if requested == "" {
		requested = v1.StrategyHybrid
	}
	var transport string
	early, dedup := true, true
	zstd := true
	var noEarly, noDedup, noStrategy []string
	for _, h := range hosts {
		c := capabilitiesOf(h)
		switch {
		case transport == "":
			transport = c.Transport
		case c.Transport != transport:
			return "", fmt.Sprintf("host %s migrates through transport %q but %s through %q; pick a target host with the same backend", h.Name, c.Transport, hosts[0].Name, transport)
		}
		if !c.EarlyResume {
			early = false
			noEarly = append(noEarly, h.Name)
		}
		if !slices.Contains(c.Compression, v1.PageCodecZstd) {
			zstd = false
		}
		if !c.Dedup {
			dedup = false
			noDedup = append(noDedup, h.Name)
		}
		if !slices.Contains(c.Strategies, v1.StrategyPreCopy) {
			noStrategy = append(noStrategy, h.Name)
		}
	}
	if len(noStrategy) > 0 {
		return "", fmt.Sprintf("host %s cannot run any migration strategy xenferry knows; check its agent's version", strings.Join(noStrategy, ", "))
	}
	base, withDedup := strings.CutSuffix(p.EngineStrategy, "+dedup")
	var notes []string
	switch {
	case base == "postcopy" && !early:
		return "", fmt.Sprintf("strategy PostCopy needs early resume, which host %s (transport %s) cannot do; use strategy PreCopy or Hybrid", strings.Join(noEarly, ", "), transport)
	case base == "hybrid" && !early:
		base = "precopy"
		p.AllowPostCopy = false
		p.SwitchToPostCopyAfter = metav1.Duration{}
		notes = append(notes, fmt.Sprintf("%s runs as PreCopy: host %s (transport %s) cannot resume early", requested, strings.Join(noEarly, ", "), transport))
	}
	if withDedup && !dedup {
		withDedup = false
		notes = append(notes, fmt.Sprintf("without disk dedup: host %s cannot resolve disk references", strings.Join(noDedup, ", ")))
	}
	p.Compression = ""
	if zstd && len(hosts) > 0 && p.CompressionMode != v1.CompressionNever {
		p.Compression = v1.PageCodecZstd
	}
	p.EngineStrategy = base
	if withDedup {
		p.EngineStrategy += "+dedup"
	}
	return strings.Join(notes, "; "), ""
}
