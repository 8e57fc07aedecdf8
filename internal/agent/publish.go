package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// publishLoop keeps the XenHost heartbeat and the XenDomains fresh, every
// HeartbeatInterval and whenever a migration moved a domain.
func (a *Agent) publishLoop(ctx context.Context) {
	t := time.NewTicker(a.cfg.HeartbeatInterval)
	defer t.Stop()
	// The manager's cache must be running before cached reads work.
	if !a.mgr.GetCache().WaitForCacheSync(ctx) {
		return
	}
	failures := 0
	for {
		if err := telemetry.published(a.publish(ctx)); err != nil && ctx.Err() == nil {
			failures++
			// Log the first failure and then every tenth, to stay readable.
			if failures == 1 || failures%10 == 0 {
				a.log.Error(err, "Publishing the host failed; retrying", "failures", failures)
			}
		} else {
			failures = 0
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.kick:
		}
	}
}

func (a *Agent) publish(ctx context.Context) error {
	info, err := a.host.Info(ctx)
	if err != nil {
		return fmt.Errorf("host info: %w", err)
	}
	doms, err := a.host.Domains(ctx)
	if err != nil {
		return fmt.Errorf("list domains: %w", err)
	}
	a.usage.observe(doms, time.Now())
	a.costs.track(doms)
	if err := a.publishHost(ctx, info, doms); err != nil {
		return err
	}
	return a.publishDomains(ctx, doms)
}

// publishHost writes the agent's part of its XenHost's status: the
// heartbeat, inventory, load, capabilities, its own conditions and the
// certificate request. The rest (spec, status.drain, the Draining and
// Evacuated conditions, the certificate) belongs to the controller and is
// left as it is: the merge patch carries only what the agent changed, and
// when that includes the conditions list (a list is replaced whole), the
// patch is conditional on the resourceVersion read, retried on conflict,
// so a controller's condition written meanwhile is never undone.
func (a *Agent) publishHost(ctx context.Context, info xenmem.HostInfo, doms []xenmem.DomainInfo) error {
	var err error
	for i := range 3 {
		// The cache first; the API server when the conditions change and
		// after a conflict.
		if err = a.publishHostOnce(ctx, i > 0, info, doms); !apierrors.IsConflict(err) && !errors.Is(err, errStaleRead) {
			return err
		}
	}
	return err
}

// errStaleRead: the XenHost was read from the cache and the conditions
// list must be written; read it again from the API server.
var errStaleRead = errors.New("conditions change: read the XenHost from the API server")

func (a *Agent) publishHostOnce(ctx context.Context, fresh bool, info xenmem.HostInfo, doms []xenmem.DomainInfo) error {
	h := &v1.XenHost{}
	r := client.Reader(a.c)
	if fresh {
		r = a.api
	}
	err := r.Get(ctx, types.NamespacedName{Name: a.cfg.Host}, h)
	if apierrors.IsNotFound(err) {
		h = &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: a.cfg.Host}}
		if err := a.c.Create(ctx, h); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("register XenHost %s: %w", a.cfg.Host, err)
		}
		a.log.Info("Registered XenHost")
	} else if err != nil {
		return fmt.Errorf("get XenHost %s: %w", a.cfg.Host, err)
	}
	orig := h.DeepCopy()
	now := metav1.Now()
	running := 0
	for _, d := range doms {
		if d.State != xenmem.StateIncoming {
			running++
		}
	}
	h.Status.Backend, h.Status.Version, h.Status.AgentVersion, h.Status.AgentID = info.Backend, info.Version, agentVersion, a.id
	h.Status.CPUs = int32(info.CPUs)
	h.Status.CapacityBytes, h.Status.FreeBytes = int64(info.TotalMemoryBytes), int64(info.FreeMemoryBytes)
	h.Status.Domains = int32(running)
	h.Status.DataAddress = a.DataAddress()
	h.Status.Capabilities = capabilitiesOf(info.Capabilities)
	h.Status.HeartbeatTime = &now
	h.Status.Load = a.usage.hostLoad(doms, now.Time)
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostAgentReadyCondition, Status: metav1.ConditionTrue,
		Reason: "Heartbeating", Message: "Agent " + a.id + " serves migrations at " + a.DataAddress()})
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostBackendReadyCondition, Status: metav1.ConditionTrue,
		Reason: "BackendReachable", Message: fmt.Sprintf("%s backend %s, %d domains", info.Backend, info.Version, running)})
	if _, err := a.tlsStatus(h); err != nil {
		return fmt.Errorf("certificate request of XenHost %s: %w", a.cfg.Host, err)
	}
	patch := client.MergeFrom(orig)
	if !equality.Semantic.DeepEqual(orig.Status.Conditions, h.Status.Conditions) {
		if !fresh {
			return errStaleRead // a conflict on a stale cache would cost a patch more
		}
		patch = client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{})
	}
	if err := a.c.Status().Patch(ctx, h, patch); err != nil {
		return fmt.Errorf("heartbeat XenHost %s: %w", a.cfg.Host, err)
	}
	return nil
}

// publishDomains writes one XenDomain per domain running here and removes
// the ones this host published for domains that are gone. A XenDomain that
// names another host is left alone unless the domain runs here now (it just
// arrived); one that is being migrated out keeps naming this host until the
// target takes it over.
func (a *Agent) publishDomains(ctx context.Context, doms []xenmem.DomainInfo) error {
	here := map[string]bool{}  // bounded by the domains of this host
	disks := map[string]bool{} // their disks
	var errs []error
	for _, d := range doms {
		if d.State == xenmem.StateIncoming || d.State == xenmem.StateShutdown {
			continue
		}
		for _, disk := range d.Disks {
			disks[disk.Path] = true
			a.indexer.want(disk.Path)
		}
		ns := d.Namespace
		if ns == "" {
			ns = a.cfg.Namespace
		}
		name := domainObjectName(d.Name)
		here[ns+"/"+name] = true
		if err := a.publishDomain(ctx, ns, name, d); err != nil {
			errs = append(errs, err)
		}
	}
	a.indexer.keep(disks)
	var list v1.XenDomainList
	if err := a.c.List(ctx, &list); err != nil {
		return fmt.Errorf("list XenDomains: %w", err)
	}
	for i := range list.Items {
		xd := &list.Items[i]
		if xd.Status.Host != a.cfg.Host || here[xd.Namespace+"/"+xd.Name] {
			continue
		}
		if a.migratingOut(xd.Spec.DomainName) {
			// The target takes this object over (namespace, labels and
			// all); deleting it first would lose them.
			continue
		}
		// The resourceVersion precondition keeps a target's fresh takeover.
		err := a.c.Delete(ctx, xd, client.Preconditions{UID: &xd.UID, ResourceVersion: &xd.ResourceVersion})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			errs = append(errs, fmt.Errorf("delete XenDomain %s/%s: %w", xd.Namespace, xd.Name, err))
			continue
		}
		if err == nil {
			a.log.Info("Removed XenDomain of a domain no longer on this host", "xendomain", xd.Namespace+"/"+xd.Name)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("publish XenDomains: %v", errs)
	}
	return nil
}

func (a *Agent) publishDomain(ctx context.Context, ns, name string, d xenmem.DomainInfo) error {
	spec := v1.XenDomainSpec{DomainName: d.Name, UUID: d.UUID, MemoryBytes: int64(d.MemoryBytes), VCPUs: int32(d.VCPUs)}
	for _, disk := range d.Disks {
		spec.Disks = append(spec.Disks, v1.DomainDisk{ID: disk.ID, Path: disk.Path, ReadOnly: disk.ReadOnly})
	}
	xd := &v1.XenDomain{}
	err := a.c.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, xd)
	switch {
	case apierrors.IsNotFound(err):
		xd = &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: d.Labels}, Spec: spec}
		if err := a.c.Create(ctx, xd); err != nil {
			if apierrors.IsAlreadyExists(err) {
				return nil // next round
			}
			return fmt.Errorf("create XenDomain %s/%s: %w", ns, name, err)
		}
		a.log.Info("Published XenDomain", "xendomain", ns+"/"+name)
	case err != nil:
		return fmt.Errorf("get XenDomain %s/%s: %w", ns, name, err)
	default:
		if xd.Status.Host != "" && xd.Status.Host != a.cfg.Host && d.State != xenmem.StateRunning {
			return nil // being migrated out and already taken over, or not ours
		}
	}
	if !equalSpec(xd.Spec, spec) {
		orig := xd.DeepCopy()
		xd.Spec = spec
		if err := a.c.Patch(ctx, xd, client.MergeFrom(orig)); err != nil {
			return fmt.Errorf("update XenDomain %s/%s: %w", ns, name, err)
		}
	}
	orig := xd.DeepCopy()
	now := metav1.Now()
	indexes := a.indexer.status(d.Disks)
	if xd.Status.Host != a.cfg.Host && xd.Status.Host != "" {
		a.usage.seed(d.Name, xd.Status.CPUMillis)
	}
	cpu, cost := a.usage.cpuMillis(d.Name), a.predictedCost(d)
	if xd.Status.Host == a.cfg.Host && xd.Status.State == string(d.State) && xd.Status.DomID == int32(d.ID) &&
		equality.Semantic.DeepEqual(xd.Status.DiskIndexes, indexes) && xd.Status.LastUpdateTime != nil {
		age := now.Sub(xd.Status.LastUpdateTime.Time)
		moved := cpuChanged(xd.Status.CPUMillis, cpu) || costChanged(xd.Status.PredictedCost, cost)
		if age < time.Minute && (!moved || age < loadWriteGap) {
			return nil // unchanged, or only load moved and written lately; refresh at most once a minute
		}
	}
	if xd.Status.Host != a.cfg.Host && xd.Status.Host != "" {
		a.log.Info("Took over XenDomain: the domain runs here now", "xendomain", ns+"/"+name, "previousHost", xd.Status.Host)
	}
	xd.Status = v1.XenDomainStatus{Host: a.cfg.Host, DomID: int32(d.ID), State: string(d.State), LastUpdateTime: &now, DiskIndexes: indexes,
		CPUMillis: cpu, PredictedCost: cost}
	if err := a.c.Status().Patch(ctx, xd, client.MergeFrom(orig)); err != nil {
		return fmt.Errorf("update status of XenDomain %s/%s: %w", ns, name, err)
	}
	return nil
}

func equalSpec(a, b v1.XenDomainSpec) bool {
	if a.DomainName != b.DomainName || a.UUID != b.UUID || a.MemoryBytes != b.MemoryBytes || a.VCPUs != b.VCPUs || len(a.Disks) != len(b.Disks) {
		return false
	}
	for i := range a.Disks {
		if a.Disks[i] != b.Disks[i] {
			return false
		}
	}
	return true
}

// capabilitiesOf maps the backend's data-path capabilities onto the API's.
func capabilitiesOf(c xenmem.Capabilities) *v1.HostCapabilities {
	out := &v1.HostCapabilities{Transport: c.Transport, Dedup: c.Dedup, EarlyResume: c.EarlyResume}
	for _, z := range c.Compression {
		if z == string(v1.PageCodecZstd) {
			out.Compression = append(out.Compression, v1.PageCodecZstd)
		}
	}
	for _, s := range c.Strategies {
		switch s {
		case "precopy":
			out.Strategies = append(out.Strategies, v1.StrategyPreCopy)
		case "postcopy":
			out.Strategies = append(out.Strategies, v1.StrategyPostCopy)
		case "hybrid":
			out.Strategies = append(out.Strategies, v1.StrategyHybrid)
		}
	}
	return out
}

// migratingOut reports whether an outgoing migration of this agent holds
// the domain (running, or done but not yet dropped).
func (a *Agent) migratingOut(domain string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.runs {
		if r.role == roleSource && r.domain == domain {
			return true
		}
	}
	for name, at := range a.departed {
		if time.Since(at) >= departedGrace {
			delete(a.departed, name)
		}
	}
	_, gone := a.departed[domain]
	return gone
}

// departedGrace is how long the XenDomain of a domain that migrated away
// is left for the target to take over, after the source dropped its half
// (the migration ended): the target's next publish, a heartbeat away, takes
// it over; only then would deleting it here lose its namespace and labels.
const departedGrace = time.Minute
