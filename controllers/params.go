package controllers

import (
	"fmt"
	"sort"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// Defaults are the built-in migration parameters, used when neither the
// VMMigration nor a MigrationPolicy sets a value.
type Defaults struct {
	MaxDowntime             time.Duration
	CompletionTimeoutPerGiB time.Duration
	ProgressTimeout         time.Duration
	// MinCompletionTimeout keeps tiny domains from getting a timeout of
	// a few milliseconds.
	MinCompletionTimeout time.Duration
}

// DefaultDefaults mirrors KubeVirt's defaults (150 s per GiB, 150 s without
// progress) with a 300 ms downtime target.
var DefaultDefaults = Defaults{
	MaxDowntime:             300 * time.Millisecond,
	CompletionTimeoutPerGiB: 150 * time.Second,
	ProgressTimeout:         150 * time.Second,
	MinCompletionTimeout:    10 * time.Second,
}

// policyScore is how specific a policy's selectors are: the number of label
// requirements they name. -1 means the policy does not match.
func policyScore(p *v1.MigrationPolicy, nsLabels, domLabels map[string]string) (int, error) {
	score := 0
	for _, sel := range []struct {
		s   *metav1.LabelSelector
		lbl map[string]string
		who string
	}{
		{p.Spec.Selectors.NamespaceSelector, nsLabels, "namespaceSelector"},
		{p.Spec.Selectors.DomainSelector, domLabels, "domainSelector"},
	} {
		if sel.s == nil {
			continue
		}
		ls, err := metav1.LabelSelectorAsSelector(sel.s)
		if err != nil {
			return -1, fmt.Errorf("policy %s %s: %w", p.Name, sel.who, err)
		}
		if !ls.Matches(labels.Set(sel.lbl)) {
			return -1, nil
		}
		score += len(sel.s.MatchLabels) + len(sel.s.MatchExpressions)
	}
	return score, nil
}

// selectPolicy picks the most specific matching policy (most label
// requirements; ties to the alphabetically first name). It returns nil when
// none matches. Policies with a broken selector are skipped and reported.
func selectPolicy(policies []v1.MigrationPolicy, nsLabels, domLabels map[string]string) (*v1.MigrationPolicy, []error) {
	sorted := make([]*v1.MigrationPolicy, 0, len(policies))
	for i := range policies {
		sorted = append(sorted, &policies[i])
	}
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	var best *v1.MigrationPolicy
	bestScore := -1
	var errs []error
	for _, p := range sorted {
		s, err := policyScore(p, nsLabels, domLabels)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if s > bestScore {
			best, bestScore = p, s
		}
	}
	return best, errs
}

// resolveParameters merges spec over policy over defaults and maps the
// user-facing strategy onto the data path's strategy names.
func resolveParameters(spec *v1.VMMigrationSpec, policy *v1.MigrationPolicy, memoryBytes int64, d Defaults) v1.ResolvedParameters {
	var pp v1.MigrationParameters
	if policy != nil {
		pp = policy.Spec.MigrationParameters
	}
	sp := spec.MigrationParameters
	out := v1.ResolvedParameters{}
	if policy != nil {
		out.Policy = policy.Name
	}
	switch {
	case sp.Bandwidth != nil:
		out.BandwidthBytesPerSecond = sp.Bandwidth.Value()
	case pp.Bandwidth != nil:
		out.BandwidthBytesPerSecond = pp.Bandwidth.Value()
	}
	pick := func(a, b *metav1.Duration, def time.Duration) time.Duration {
		if a != nil {
			return a.Duration
		}
		if b != nil {
			return b.Duration
		}
		return def
	}
	out.MaxDowntime = metav1.Duration{Duration: pick(sp.MaxDowntime, pp.MaxDowntime, d.MaxDowntime)}
	perGiB := pick(sp.CompletionTimeoutPerGiB, pp.CompletionTimeoutPerGiB, d.CompletionTimeoutPerGiB)
	ct := time.Duration(float64(perGiB) * float64(memoryBytes) / float64(1<<30))
	if ct < d.MinCompletionTimeout {
		ct = d.MinCompletionTimeout
	}
	out.CompletionTimeout = metav1.Duration{Duration: ct}
	out.ProgressTimeout = metav1.Duration{Duration: pick(sp.ProgressTimeout, pp.ProgressTimeout, d.ProgressTimeout)}

	strategy := spec.Strategy
	if strategy == "" {
		strategy = v1.StrategyHybrid
	}
	allowPost := strategy != v1.StrategyPreCopy
	switch {
	case sp.AllowPostCopy != nil:
		allowPost = *sp.AllowPostCopy
	case pp.AllowPostCopy != nil && strategy == v1.StrategyPreCopy:
		// A policy may allow post-copy for PreCopy migrations; it never
		// forbids it for migrations that asked for PostCopy or Hybrid.
		allowPost = *pp.AllowPostCopy
	}
	out.AllowPostCopy = allowPost
	switch {
	case sp.Compression != nil:
		out.CompressionMode = *sp.Compression
	case pp.Compression != nil:
		out.CompressionMode = *pp.Compression
	default:
		out.CompressionMode = v1.CompressionAuto
	}
	if allowPost && (sp.CompletionTimeoutPerGiB != nil || pp.CompletionTimeoutPerGiB != nil) {
		out.SwitchToPostCopyAfter = out.CompletionTimeout
	}
	dedup := spec.Dedup == nil || *spec.Dedup
	var engine string
	switch {
	case strategy == v1.StrategyPostCopy:
		engine = "postcopy"
	case strategy == v1.StrategyHybrid, allowPost:
		// PreCopy with post-copy allowed is the hybrid engine: pre-copy
		// first, post-copy only if it does not converge in time.
		engine = "hybrid"
	default:
		engine = "precopy"
	}
	if dedup && engine != "postcopy" {
		engine += "+dedup"
	}
	out.EngineStrategy = engine
	return out
}
