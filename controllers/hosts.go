package controllers

import (
	"fmt"
	"sort"
	"strings"
	"time"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// Limits bound how many migrations run at once.
type Limits struct {
	// Cluster is the number of migrations holding a slot cluster-wide.
	Cluster int
	// OutboundPerHost is the number leaving one host.
	OutboundPerHost int
	// InboundPerHost is the number arriving at one host.
	InboundPerHost int
}

// DefaultLimits mirror KubeVirt (5 per cluster, 2 outbound per node) plus an
// inbound limit of 2 per host, which KubeVirt lacks.
var DefaultLimits = Limits{Cluster: 5, OutboundPerHost: 2, InboundPerHost: 2}

// load is what the active migrations (those holding a slot) put on hosts.
type load struct {
	total         int
	outbound      map[string]int
	inbound       map[string]int
	inboundMemory map[string]int64
}

// computeLoad counts the slot-holding migrations other than self. The maps
// are bounded by the number of hosts.
func computeLoad(migs []v1.VMMigration, selfUID string) load {
	l := load{outbound: map[string]int{}, inbound: map[string]int{}, inboundMemory: map[string]int64{}}
	for i := range migs {
		m := &migs[i]
		if string(m.UID) == selfUID || !m.Status.Phase.HoldsSlot() {
			continue
		}
		l.total++
		if m.Status.SourceHost != "" {
			l.outbound[m.Status.SourceHost]++
		}
		if m.Status.TargetHost != "" {
			l.inbound[m.Status.TargetHost]++
			if m.Status.Target == nil || !m.Status.Target.Resumed {
				l.inboundMemory[m.Status.TargetHost] += m.Status.DomainMemoryBytes
			}
		}
	}
	return l
}

// hostDraining reports whether the host is being evacuated: asked by its
// spec, or by the controller's Draining condition (its Node cordoned, its
// Machine deleted). Nothing is placed on a draining host.
func hostDraining(h *v1.XenHost) bool {
	if h.Spec.Drain {
		return true
	}
	for _, c := range h.Status.Conditions {
		if c.Type == v1.HostDrainingCondition {
			return c.Status == "True"
		}
	}
	return false
}

// antiAffinityValues returns the values of the anti-affinity label keys a
// domain carries (keys: AntiAffinityKey and extra).
func antiAffinityValues(labels map[string]string, extra []string) map[string]string {
	var out map[string]string
	for _, k := range append([]string{v1.AntiAffinityKey}, extra...) {
		if v, ok := labels[k]; ok && v != "" {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// antiAffinityAvoid maps each host that runs another domain sharing one of
// vals (key -> value) to why the domain must not go there.
func antiAffinityAvoid(doms []v1.XenDomain, self *v1.XenDomain, vals map[string]string) map[string]string {
	if len(vals) == 0 {
		return nil
	}
	avoid := map[string]string{} // bounded by the hosts
	for i := range doms {
		d := &doms[i]
		if d.Namespace == self.Namespace && d.Name == self.Name || d.Status.Host == "" {
			continue
		}
		for k, v := range vals {
			if d.Labels[k] == v {
				avoid[d.Status.Host] = fmt.Sprintf("runs %s/%s with %s=%s (anti-affinity)", d.Namespace, d.Name, k, v)
			}
		}
	}
	return avoid
}

// hostFresh reports whether the host's agent heartbeat is recent.
func hostFresh(h *v1.XenHost, now time.Time, timeout time.Duration) bool {
	return h.Status.HeartbeatTime != nil && now.Sub(h.Status.HeartbeatTime.Time) <= timeout
}

// compatible reports why two hosts cannot exchange domains, or "" if they can.
// Hosts must share the backend and the hypervisor's major.minor version.
func incompatibility(src, dst *v1.XenHost) string {
	if src.Status.Backend != dst.Status.Backend {
		return fmt.Sprintf("source %s runs backend %q but target %s runs %q", src.Name, src.Status.Backend, dst.Name, dst.Status.Backend)
	}
	if majorMinor(src.Status.Version) != majorMinor(dst.Status.Version) {
		return fmt.Sprintf("source %s runs hypervisor %q but target %s runs %q (major.minor must match)", src.Name, src.Status.Version, dst.Name, dst.Status.Version)
	}
	return ""
}

func majorMinor(v string) string {
	parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
	if len(parts) >= 2 {
		return parts[0] + "." + parts[1]
	}
	return v
}

// fitReason explains why host cannot take memBytes more, or "" if it can.
func fitReason(h *v1.XenHost, memBytes int64, l load) string {
	free := h.Status.FreeBytes - l.inboundMemory[h.Name]
	if free < memBytes {
		return fmt.Sprintf("target %s has %s free (after %s reserved for incoming migrations) but the domain needs %s",
			h.Name, gib(h.Status.FreeBytes-l.inboundMemory[h.Name]), gib(l.inboundMemory[h.Name]), gib(memBytes))
	}
	return ""
}

func gib(b int64) string {
	return fmt.Sprintf("%.2f GiB", float64(b)/float64(1<<30))
}

// chooseTarget picks the host with the most free memory (after reservations)
// among fresh, schedulable, compatible hosts other than the source that are
// under the inbound limit. It returns why none fits otherwise.
// avoid names hosts excluded for this domain (anti-affinity), with why.
func chooseTarget(hosts []v1.XenHost, src *v1.XenHost, memBytes int64, l load, lim Limits, now time.Time, hb time.Duration, avoid map[string]string) (*v1.XenHost, string) {
	type cand struct {
		h    *v1.XenHost
		free int64
	}
	var cands []cand
	var why []string
	for i := range hosts {
		h := &hosts[i]
		switch {
		case h.Name == src.Name:
			continue
		case h.Spec.Unschedulable:
			why = append(why, h.Name+": cordoned")
		case hostDraining(h):
			why = append(why, h.Name+": draining")
		case avoid[h.Name] != "":
			why = append(why, h.Name+": "+avoid[h.Name])
		case !hostFresh(h, now, hb):
			why = append(why, h.Name+": agent heartbeat stale")
		case incompatibility(src, h) != "":
			why = append(why, h.Name+": incompatible")
		case fitReason(h, memBytes, l) != "":
			why = append(why, h.Name+": not enough free memory")
		case lim.InboundPerHost > 0 && l.inbound[h.Name] >= lim.InboundPerHost:
			why = append(why, h.Name+": inbound limit reached")
		default:
			cands = append(cands, cand{h, h.Status.FreeBytes - l.inboundMemory[h.Name]})
		}
	}
	if len(cands) == 0 {
		if len(why) == 0 {
			return nil, "no other XenHost exists"
		}
		return nil, "no host fits: " + strings.Join(why, "; ")
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].free != cands[j].free {
			return cands[i].free > cands[j].free
		}
		return cands[i].h.Name < cands[j].h.Name
	})
	return cands[0].h, ""
}
