package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RebalanceMode says what a RebalancePolicy optimises.
// +kubebuilder:validation:Enum=Performance;Density
type RebalanceMode string

const (
	// RebalancePerformance spreads load: it moves domains from the most to
	// the least loaded hosts until the spread of load is within the band.
	RebalancePerformance RebalanceMode = "Performance"
	// RebalanceDensity consolidates: it moves domains off the least loaded
	// hosts while the others stay below the low threshold, and reports the
	// hosts that could then be emptied (and powered down).
	RebalanceDensity RebalanceMode = "Density"
)

// LoadWeights weigh a host's CPU and memory utilisation into its load.
type LoadWeights struct {
	// cpu weight (default 1).
	// +optional
	// +kubebuilder:validation:Minimum=0
	CPU *int32 `json:"cpu,omitempty"`
	// memory weight (default 1).
	// +optional
	// +kubebuilder:validation:Minimum=0
	Memory *int32 `json:"memory,omitempty"`
}

// RebalancePolicySpec configures one load-balancing policy. A host's load
// is the weighted mean of its CPU utilisation (the domains' vCPU time over
// the host's CPUs) and memory utilisation (domain memory over capacity), in
// percent, smoothed over smoothingWindow. Imbalance is the difference
// between the most and the least loaded host.
//
// +kubebuilder:validation:XValidation:rule="!has(self.targetImbalancePercent) || !has(self.triggerImbalancePercent) || self.targetImbalancePercent < self.triggerImbalancePercent",message="targetImbalancePercent must be below triggerImbalancePercent (hysteresis)"
type RebalancePolicySpec struct {
	// mode: Performance (spread load, the default) or Density (consolidate).
	// +optional
	// +kubebuilder:default=Performance
	Mode RebalanceMode `json:"mode,omitempty"`
	// weights of CPU and memory in a host's load.
	// +optional
	Weights LoadWeights `json:"weights,omitempty"`
	// triggerImbalancePercent starts rebalancing (Performance) when the
	// imbalance exceeds it (default 20).
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	TriggerImbalancePercent *int32 `json:"triggerImbalancePercent,omitempty"`
	// targetImbalancePercent stops rebalancing once the imbalance is at or
	// below it (default 10): the band between it and the trigger is the
	// hysteresis that keeps the policy from flapping.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	TargetImbalancePercent *int32 `json:"targetImbalancePercent,omitempty"`
	// lowThresholdPercent: a domain moves only if its destination's load
	// stays below this afterwards (default 80).
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	LowThresholdPercent *int32 `json:"lowThresholdPercent,omitempty"`
	// interval between planning cycles (default 30s).
	// +optional
	Interval *metav1.Duration `json:"interval,omitempty"`
	// smoothingWindow over which host load is averaged (default 5m); a
	// load spike shorter than this moves nothing.
	// +optional
	SmoothingWindow *metav1.Duration `json:"smoothingWindow,omitempty"`
	// cooldown: a domain this policy moved is not moved again by it for
	// this long (default 30m).
	// +optional
	Cooldown *metav1.Duration `json:"cooldown,omitempty"`
	// maxConcurrent rebalancing migrations of this policy (default 1).
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxConcurrent *int32 `json:"maxConcurrent,omitempty"`
	// maxPerHour: at most this many migrations started in any hour (default 10).
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxPerHour *int32 `json:"maxPerHour,omitempty"`
	// domainSelector limits the domains the policy may move (default all).
	// +optional
	DomainSelector *metav1.LabelSelector `json:"domainSelector,omitempty"`
	// namespaceSelector limits the namespaces of those domains.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// excludedHosts are neither sources nor destinations.
	// +optional
	// +listType=set
	ExcludedHosts []string `json:"excludedHosts,omitempty"`
	// excludedDomains ("namespace/name") are never moved.
	// +optional
	// +listType=set
	ExcludedDomains []string `json:"excludedDomains,omitempty"`
	// antiAffinityLabels: domains that share a value of one of these label
	// keys are not placed on the same host (migration.xenferry.io/anti-affinity
	// always counts).
	// +optional
	// +listType=set
	AntiAffinityLabels []string `json:"antiAffinityLabels,omitempty"`
	// dryRun computes the plan into status only and moves nothing.
	// +optional
	DryRun bool `json:"dryRun,omitempty"`
}

// HostLoadStatus is one host's load as the policy sees it.
type HostLoadStatus struct {
	Host string `json:"host"`
	// loadPercent is the smoothed, weighted load.
	LoadPercent int32 `json:"loadPercent"`
	// +optional
	CPUPercent int32 `json:"cpuPercent,omitempty"`
	// +optional
	MemoryPercent int32 `json:"memoryPercent,omitempty"`
	// +optional
	Domains int32 `json:"domains,omitempty"`
}

// PlannedMove is one migration of a plan.
type PlannedMove struct {
	Namespace string `json:"namespace"`
	Domain    string `json:"domain"`
	From      string `json:"from"`
	To        string `json:"to"`
	// imbalanceAfterPercent is the predicted imbalance after this and the
	// moves before it.
	ImbalanceAfterPercent int32 `json:"imbalanceAfterPercent"`
	// predictedBytes and predictedTime: the domain's predicted cost.
	// +optional
	PredictedBytes int64 `json:"predictedBytes,omitempty"`
	// +optional
	PredictedTime metav1.Duration `json:"predictedTime,omitempty"`
	// migration created for the move (empty in dry run, or not yet).
	// +optional
	Migration string `json:"migration,omitempty"`
}

// RebalancePolicyStatus is the controller's view and plan.
type RebalancePolicyStatus struct {
	// active: the imbalance crossed the trigger and has not yet come back
	// within the target band.
	// +optional
	Active bool `json:"active,omitempty"`
	// imbalancePercent now (smoothed).
	// +optional
	ImbalancePercent int32 `json:"imbalancePercent,omitempty"`
	// cycles planned since the policy was created.
	// +optional
	Cycles int64 `json:"cycles,omitempty"`
	// lastCycleTime is when the last plan was made.
	// +optional
	LastCycleTime *metav1.Time `json:"lastCycleTime,omitempty"`
	// hosts and their load.
	// +optional
	// +kubebuilder:validation:MaxItems=1024
	Hosts []HostLoadStatus `json:"hosts,omitempty"`
	// plan of the last cycle, best move first.
	// +optional
	// +kubebuilder:validation:MaxItems=64
	Plan []PlannedMove `json:"plan,omitempty"`
	// emptiableHosts (Density) could be emptied by the plan.
	// +optional
	EmptiableHosts []string `json:"emptiableHosts,omitempty"`
	// migrationsStarted in total, and in the last hour.
	// +optional
	MigrationsStarted int64 `json:"migrationsStarted,omitempty"`
	// +optional
	MigrationsLastHour int32 `json:"migrationsLastHour,omitempty"`
	// recentMoves remember, per domain, when and where this policy last
	// moved it (cooldown and oscillation guard; bounded).
	// +optional
	// +kubebuilder:validation:MaxItems=256
	RecentMoves []RecentMove `json:"recentMoves,omitempty"`
	// message explains the last decision.
	// +optional
	Message string `json:"message,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// RecentMove is one migration a policy started.
type RecentMove struct {
	Namespace string      `json:"namespace"`
	Domain    string      `json:"domain"`
	From      string      `json:"from"`
	To        string      `json:"to"`
	Time      metav1.Time `json:"time"`
	Migration string      `json:"migration"`
}

// RebalancePolicy (cluster-scoped) balances domains across hosts.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=rbp,categories=xenferry
// +kubebuilder:printcolumn:name="Mode",type=string,JSONPath=`.spec.mode`
// +kubebuilder:printcolumn:name="Active",type=boolean,JSONPath=`.status.active`
// +kubebuilder:printcolumn:name="Imbalance",type=integer,JSONPath=`.status.imbalancePercent`
// +kubebuilder:printcolumn:name="DryRun",type=boolean,JSONPath=`.spec.dryRun`
// +kubebuilder:printcolumn:name="Started",type=integer,JSONPath=`.status.migrationsStarted`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type RebalancePolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec RebalancePolicySpec `json:"spec,omitempty"`
	// +optional
	Status RebalancePolicyStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// RebalancePolicyList is a list of RebalancePolicies.
type RebalancePolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []RebalancePolicy `json:"items"`
}
