package v1alpha1

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MigrationStrategy says how memory moves.
// +kubebuilder:validation:Enum=PreCopy;PostCopy;Hybrid
type MigrationStrategy string

const (
	// StrategyPreCopy copies memory while the domain runs on the source and
	// switches over after a short stop-and-copy.
	StrategyPreCopy MigrationStrategy = "PreCopy"
	// StrategyPostCopy resumes the domain on the target at once and loads
	// its memory lazily afterwards.
	StrategyPostCopy MigrationStrategy = "PostCopy"
	// StrategyHybrid runs pre-copy while it converges, then switches to
	// post-copy.
	StrategyHybrid MigrationStrategy = "Hybrid"
)

// MigrationParameters are the tunables of a migration. A VMMigration's own
// values override its MigrationPolicy's, which override the built-in defaults.
type MigrationParameters struct {
	// bandwidth caps the bytes per second put on the wire; 0 means unlimited.
	// +optional
	// +kubebuilder:validation:XValidation:rule="!string(self).startsWith('-')",message="bandwidth must not be negative: give bytes per second such as 100Mi, or 0 for unlimited"
	Bandwidth *resource.Quantity `json:"bandwidth,omitempty"`
	// maxDowntime is the pause the switch-over aims to stay under.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="maxDowntime must be a positive duration such as 300ms"
	MaxDowntime *metav1.Duration `json:"maxDowntime,omitempty"`
	// completionTimeoutPerGiB bounds the migration: after this much time per
	// GiB of guest memory the migration switches to post-copy (when allowed)
	// or is cancelled.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="completionTimeoutPerGiB must be a positive duration such as 150s"
	CompletionTimeoutPerGiB *metav1.Duration `json:"completionTimeoutPerGiB,omitempty"`
	// progressTimeout cancels a migration whose transferred bytes have not
	// grown for this long.
	// +optional
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="progressTimeout must be a positive duration such as 150s"
	ProgressTimeout *metav1.Duration `json:"progressTimeout,omitempty"`
	// allowPostCopy lets a PreCopy migration switch to post-copy when it does
	// not converge in time. PostCopy and Hybrid need it (the default).
	// +optional
	AllowPostCopy *bool `json:"allowPostCopy,omitempty"`
	// compression of the pages that go in full. Auto (the default)
	// compresses a batch when that brings it across sooner: on a slow
	// link, or in time the source spends waiting for its input anyway.
	// Always compresses every batch that shrinks, trading the source's
	// CPU time for bytes (a WAN, a metered or shared link). Never sends
	// pages as they are. Pages go as they are between hosts that do not
	// both decode the codec.
	// +optional
	Compression *CompressionMode `json:"compression,omitempty"`
}

// CompressionMode says when page batches go compressed.
// +kubebuilder:validation:Enum=Auto;Always;Never
type CompressionMode string

const (
	CompressionAuto   CompressionMode = "Auto"
	CompressionAlways CompressionMode = "Always"
	CompressionNever  CompressionMode = "Never"
)

// VMMigrationSpec is what the user asks for.
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)",message="cancel cannot be undone"
// +kubebuilder:validation:XValidation:rule="has(self.targetHost) == has(oldSelf.targetHost) && (!has(self.targetHost) || self.targetHost == oldSelf.targetHost)",message="targetHost is immutable; create a new VMMigration instead"
// +kubebuilder:validation:XValidation:rule="!has(self.strategy) || self.strategy == 'PreCopy' || !has(self.allowPostCopy) || self.allowPostCopy",message="strategy PostCopy and Hybrid need allowPostCopy; set strategy PreCopy to forbid post-copy"
type VMMigrationSpec struct {
	// domain names the XenDomain, in this namespace, to migrate.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="domain is immutable; create a new VMMigration instead"
	Domain string `json:"domain"`
	// targetHost names the XenHost to migrate to; empty lets the controller
	// choose (enough free memory, not cordoned, least loaded).
	// +optional
	TargetHost string `json:"targetHost,omitempty"`
	// strategy is PreCopy, PostCopy or Hybrid (the default).
	// +optional
	// +kubebuilder:default=Hybrid
	Strategy MigrationStrategy `json:"strategy,omitempty"`
	// dedup sends pages that equal blocks of the domain's shared disks as
	// references, read and verified at the target. On by default.
	// +optional
	// +kubebuilder:default=true
	Dedup *bool `json:"dedup,omitempty"`
	// policyRef names the MigrationPolicy to use; empty picks the most
	// specific policy whose selectors match.
	// +optional
	PolicyRef string `json:"policyRef,omitempty"`
	// MigrationParameters override the policy's defaults.
	MigrationParameters `json:",inline"`
	// cancel asks to stop the migration. Honoured in every phase until the
	// domain has resumed on the target; it cannot be undone.
	// +optional
	Cancel bool `json:"cancel,omitempty"`
	// priority orders the migrations waiting for a concurrency slot:
	// Evacuation (drains) before User (the default) before Rebalance. A
	// waiting Evacuation may cancel a Rebalance migration that holds a slot
	// it needs and has not passed the point of no return.
	// +optional
	// +kubebuilder:default=User
	Priority MigrationPriority `json:"priority,omitempty"`
}

// MigrationPriority is a VMMigration's class when slots are granted.
// +kubebuilder:validation:Enum=Evacuation;User;Rebalance
type MigrationPriority string

const (
	PriorityEvacuation MigrationPriority = "Evacuation"
	PriorityUser       MigrationPriority = "User"
	PriorityRebalance  MigrationPriority = "Rebalance"
)

// Rank orders priorities: higher first.
func (p MigrationPriority) Rank() int {
	switch p {
	case PriorityEvacuation:
		return 2
	case PriorityRebalance:
		return 0
	}
	return 1
}

// Labels the controller puts on the migrations it creates.
const (
	// ReasonLabel: why the migration exists: "drain", "rebalance"
	// (absent on a user's).
	ReasonLabel = "migration.xenferry.io/reason"
	// DrainHostLabel: the host a drain migration evacuates.
	DrainHostLabel = "migration.xenferry.io/drain-host"
	// RebalancePolicyLabel: the RebalancePolicy that planned the migration.
	RebalancePolicyLabel = "migration.xenferry.io/rebalance-policy"
	// PreemptedByAnnotation names the migration that asked this one to
	// give up its slot.
	PreemptedByAnnotation = "migration.xenferry.io/preempted-by"
)

// VMMigrationPhase summarises where a migration is. Software should read the
// conditions and the agents' halves of the status, not the phase.
type VMMigrationPhase string

const (
	// MigrationPending: accepted, not validated yet.
	MigrationPending VMMigrationPhase = "Pending"
	// MigrationScheduling: validated; waiting for a concurrency slot and a
	// target host with room (see the Scheduled condition).
	MigrationScheduling VMMigrationPhase = "Scheduling"
	// MigrationPreparingTarget: the target agent is creating the receiving
	// domain and authorising the migration's token.
	MigrationPreparingTarget VMMigrationPhase = "PreparingTarget"
	// MigrationTargetReady: the target agent listens for this migration.
	MigrationTargetReady VMMigrationPhase = "TargetReady"
	// MigrationPreCopy: the source copies memory while the domain runs.
	MigrationPreCopy VMMigrationPhase = "PreCopy"
	// MigrationStopAndCopy: the domain is paused for the final copy.
	MigrationStopAndCopy VMMigrationPhase = "StopAndCopy"
	// MigrationPostCopy: the domain runs on the target and loads the rest of
	// its memory lazily. Past the point of no return.
	MigrationPostCopy VMMigrationPhase = "PostCopy"
	// MigrationSucceeded: the domain runs on the target, the source released it.
	MigrationSucceeded VMMigrationPhase = "Succeeded"
	// MigrationFailed: the migration stopped; status.failureReason says why
	// and status.domainHost where the domain runs.
	MigrationFailed VMMigrationPhase = "Failed"
	// MigrationCancelled: stopped on request; the domain runs on the source.
	MigrationCancelled VMMigrationPhase = "Cancelled"
)

// IsFinal reports whether the phase never changes again.
func (p VMMigrationPhase) IsFinal() bool {
	return p == MigrationSucceeded || p == MigrationFailed || p == MigrationCancelled
}

// HoldsSlot reports whether a migration in this phase counts against the
// concurrency limits.
func (p VMMigrationPhase) HoldsSlot() bool {
	switch p {
	case MigrationPreparingTarget, MigrationTargetReady,
		MigrationPreCopy, MigrationStopAndCopy, MigrationPostCopy:
		return true
	}
	return false
}

// PhaseTransition records when a phase was entered.
type PhaseTransition struct {
	// phase entered.
	// +required
	Phase VMMigrationPhase `json:"phase"`
	// time it was entered.
	// +required
	Time metav1.Time `json:"time"`
}

// PageClasses counts pages by how they crossed (or did not cross) the wire.
type PageClasses struct {
	// total pages of the domain.
	// +optional
	Total uint64 `json:"total,omitempty"`
	// full pages sent with their content.
	// +optional
	Full uint64 `json:"full,omitempty"`
	// zero pages sent as a page number only.
	// +optional
	Zero uint64 `json:"zero,omitempty"`
	// disk pages sent as a reference to a block of a shared disk.
	// +optional
	Disk uint64 `json:"disk,omitempty"`
	// diskFallback references the target could not verify and fetched in full.
	// +optional
	DiskFallback uint64 `json:"diskFallback,omitempty"`
	// resent pages sent again because the guest dirtied them.
	// +optional
	Resent uint64 `json:"resent,omitempty"`
	// demand pages fetched by a post-copy fault.
	// +optional
	Demand uint64 `json:"demand,omitempty"`
}

// MigrationProgress is a snapshot of a running migration.
type MigrationProgress struct {
	// round is the pre-copy iteration (1-based).
	// +optional
	Round int32 `json:"round,omitempty"`
	// bytesSent on the wire so far.
	// +optional
	BytesSent int64 `json:"bytesSent,omitempty"`
	// remainingBytes still to transfer.
	// +optional
	RemainingBytes int64 `json:"remainingBytes,omitempty"`
	// dirtyRate is the guest's dirtying rate in bytes per second.
	// +optional
	DirtyRate int64 `json:"dirtyRate,omitempty"`
	// transferRate is the wire rate in bytes per second.
	// +optional
	TransferRate int64 `json:"transferRate,omitempty"`
	// percent done, 0-100; it never decreases.
	// +optional
	Percent int32 `json:"percent,omitempty"`
	// pages by class.
	// +optional
	Pages PageClasses `json:"pages,omitempty"`
}

// MigrationResult is the outcome of a finished migration.
type MigrationResult struct {
	// totalTime from the start of the transfer until the source released the domain.
	// +optional
	TotalTime metav1.Duration `json:"totalTime,omitempty"`
	// downtime the domain was paused.
	// +optional
	Downtime metav1.Duration `json:"downtime,omitempty"`
	// resumeTime from the start until the domain ran on the target.
	// +optional
	ResumeTime metav1.Duration `json:"resumeTime,omitempty"`
	// bytesSent on the wire.
	// +optional
	BytesSent int64 `json:"bytesSent,omitempty"`
	// memoryBytes of the domain.
	// +optional
	MemoryBytes int64 `json:"memoryBytes,omitempty"`
	// dedupSavedBytes not sent thanks to disk references.
	// +optional
	DedupSavedBytes int64 `json:"dedupSavedBytes,omitempty"`
	// iterations of pre-copy.
	// +optional
	Iterations int32 `json:"iterations,omitempty"`
	// postCopy is true when the domain resumed before all memory arrived.
	// +optional
	PostCopy bool `json:"postCopy,omitempty"`
	// verified is true when every page matched the source's hash manifest.
	// +optional
	Verified bool `json:"verified,omitempty"`
	// stopReason says why pre-copy ended.
	// +optional
	StopReason string `json:"stopReason,omitempty"`
	// pages by class.
	// +optional
	Pages PageClasses `json:"pages,omitempty"`
}

// ResolvedParameters are the parameters in force, after merging the spec,
// the policy and the defaults; the agents read these, never the policy.
type ResolvedParameters struct {
	// policy is the MigrationPolicy that applied, if any.
	// +optional
	Policy string `json:"policy,omitempty"`
	// engineStrategy is the data-path strategy (precopy, postcopy, hybrid, +dedup).
	// +required
	EngineStrategy string `json:"engineStrategy"`
	// bandwidthBytesPerSecond caps the wire; 0 = unlimited.
	// +optional
	BandwidthBytesPerSecond int64 `json:"bandwidthBytesPerSecond,omitempty"`
	// maxDowntime aimed for.
	// +optional
	MaxDowntime metav1.Duration `json:"maxDowntime,omitempty"`
	// completionTimeout for this domain's memory size.
	// +optional
	CompletionTimeout metav1.Duration `json:"completionTimeout,omitempty"`
	// switchToPostCopyAfter tells the data path to switch to post-copy after
	// this much pre-copy; set to completionTimeout when post-copy is allowed
	// and a completion timeout was configured, 0 lets the data path use its
	// own budget.
	// +optional
	SwitchToPostCopyAfter metav1.Duration `json:"switchToPostCopyAfter,omitempty"`
	// progressTimeout without growth of bytes sent.
	// +optional
	ProgressTimeout metav1.Duration `json:"progressTimeout,omitempty"`
	// allowPostCopy in force.
	// +optional
	AllowPostCopy bool `json:"allowPostCopy,omitempty"`
	// compression is the codec the source may compress page batches with:
	// one that both hosts publish; empty for none (compressionMode Never,
	// or a host without it).
	// +optional
	Compression PageCodec `json:"compression,omitempty"`
	// compressionMode in force: Auto, Always or Never.
	// +optional
	CompressionMode CompressionMode `json:"compressionMode,omitempty"`
}

// SourceState is written only by the source host's agent: what it observed.
type SourceState struct {
	// host is the agent's XenHost.
	// +required
	Host string `json:"host"`
	// agentID identifies the agent process (changes when it restarts).
	// +optional
	AgentID string `json:"agentID,omitempty"`
	// phase is the data path's phase (Connecting, PreCopy, StopAndCopy, PostCopy, Done).
	// +optional
	Phase string `json:"phase,omitempty"`
	// startTime the transfer began.
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`
	// progress as the source sees it.
	// +optional
	Progress *MigrationProgress `json:"progress,omitempty"`
	// completed is true once the domain runs on the target and the source released it.
	// +optional
	Completed bool `json:"completed,omitempty"`
	// failed is true when the source gave up; the domain then runs here
	// unless the target reported it resumed.
	// +optional
	Failed bool `json:"failed,omitempty"`
	// committed is true once the source told the target to run the domain
	// ("go"): from then on the source never resumes it by itself. A failed,
	// committed source keeps the domain paused until the target's half
	// gives a verdict (discarded: the source resumes it; resumed with
	// verified memory, or completed: the source releases it).
	// +optional
	Committed bool `json:"committed,omitempty"`
	// message explains a failure or the last notable event.
	// +optional
	Message string `json:"message,omitempty"`
	// result of a completed migration.
	// +optional
	Result *MigrationResult `json:"result,omitempty"`
	// lastUpdateTime of this half.
	// +optional
	LastUpdateTime *metav1.Time `json:"lastUpdateTime,omitempty"`
}

// TargetState is written only by the target host's agent: what it observed.
type TargetState struct {
	// host is the agent's XenHost.
	// +required
	Host string `json:"host"`
	// agentID identifies the agent process (changes when it restarts).
	// +optional
	AgentID string `json:"agentID,omitempty"`
	// address is the data endpoint (host:port) the source connects to.
	// +optional
	Address string `json:"address,omitempty"`
	// ready is true when the receiver accepts this migration's token.
	// +optional
	Ready bool `json:"ready,omitempty"`
	// prepared is true once the paused receiving domain exists.
	// +optional
	Prepared bool `json:"prepared,omitempty"`
	// resumed is true once the domain runs on the target: the point of no return.
	// +optional
	Resumed bool `json:"resumed,omitempty"`
	// resumeTime the domain started running here.
	// +optional
	ResumeTime *metav1.Time `json:"resumeTime,omitempty"`
	// completed is true when every page arrived and was verified.
	// +optional
	Completed bool `json:"completed,omitempty"`
	// failed is true when the target gave up and removed the receiving domain.
	// +optional
	Failed bool `json:"failed,omitempty"`
	// discarded is true when the target destroyed the domain after it had
	// been told to run it (post-copy memory that failed verification): it
	// never runs there again, and the source may resume its paused copy.
	// +optional
	Discarded bool `json:"discarded,omitempty"`
	// message explains a failure or the last notable event.
	// +optional
	Message string `json:"message,omitempty"`
	// postCopy holds the figures of the phase after an early resume, once
	// every page is in.
	// +optional
	PostCopy *PostCopyStats `json:"postCopy,omitempty"`
	// lastUpdateTime of this half.
	// +optional
	LastUpdateTime *metav1.Time `json:"lastUpdateTime,omitempty"`
}

// PostCopyStats are the target's figures of a post-copy phase.
type PostCopyStats struct {
	// demandPages the running domain touched before they arrived, fetched
	// from the source ahead of the push.
	// +optional
	DemandPages int64 `json:"demandPages,omitempty"`
	// faultP50 is the median of those fetches, fault to page in place.
	// +optional
	FaultP50 metav1.Duration `json:"faultP50,omitempty"`
	// faultP99 is their 99th percentile.
	// +optional
	FaultP99 metav1.Duration `json:"faultP99,omitempty"`
}

// VMMigrationStatus is what the controller and the agents observed.
type VMMigrationStatus struct {
	// phase summarises the conditions; see VMMigrationPhase.
	// +optional
	Phase VMMigrationPhase `json:"phase,omitempty"`
	// conditions explain each decision.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// observedGeneration is the spec generation the controller acted on.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// phaseTransitionTimestamps record when each phase was entered.
	// +optional
	// +listType=atomic
	PhaseTransitionTimestamps []PhaseTransition `json:"phaseTransitionTimestamps,omitempty"`
	// sourceHost is where the domain ran when the migration started.
	// +optional
	SourceHost string `json:"sourceHost,omitempty"`
	// targetHost is the chosen destination.
	// +optional
	TargetHost string `json:"targetHost,omitempty"`
	// domainMemoryBytes of the domain, used for capacity and timeouts.
	// +optional
	DomainMemoryBytes int64 `json:"domainMemoryBytes,omitempty"`
	// tokens holds the per-migration token that authenticates the data
	// connection, sealed separately to the source's and the target's
	// certified keys; each box opens only with that agent's private key and
	// this migration's binding (UID, domain, hosts, role). Cleared when the
	// migration ends.
	// +optional
	Tokens *SealedTokens `json:"tokens,omitempty"`
	// parameters in force.
	// +optional
	Parameters *ResolvedParameters `json:"parameters,omitempty"`
	// abortRequested tells the agents to stop (cancel, timeout, lost peer).
	// Set by the controller only; ignored once the domain resumed on the target.
	// +optional
	AbortRequested bool `json:"abortRequested,omitempty"`
	// abortReason is the condition reason the migration ends with once the
	// agents confirm the abort (Cancelled, CompletionTimeout, ...).
	// +optional
	AbortReason string `json:"abortReason,omitempty"`
	// abortTime is when the abort was requested; the controller waits a
	// bounded time for the agents to confirm.
	// +optional
	AbortTime *metav1.Time `json:"abortTime,omitempty"`
	// source is the source agent's half.
	// +optional
	Source *SourceState `json:"source,omitempty"`
	// target is the target agent's half.
	// +optional
	Target *TargetState `json:"target,omitempty"`
	// progress summarises the source's progress; percent never decreases.
	// +optional
	Progress *MigrationProgress `json:"progress,omitempty"`
	// progressText is the printed progress column.
	// +optional
	ProgressText string `json:"progressText,omitempty"`
	// lastProgressTime is when bytes sent last grew.
	// +optional
	LastProgressTime *metav1.Time `json:"lastProgressTime,omitempty"`
	// result of a Succeeded migration.
	// +optional
	Result *MigrationResult `json:"result,omitempty"`
	// failureReason explains a Failed or Cancelled migration.
	// +optional
	FailureReason string `json:"failureReason,omitempty"`
	// domainHost is where the domain is known to run after the migration ended.
	// +optional
	DomainHost string `json:"domainHost,omitempty"`
	// startTime the controller accepted the migration.
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`
	// completionTime the migration reached a final phase.
	// +optional
	CompletionTime *metav1.Time `json:"completionTime,omitempty"`
	// predicted is the domain's predicted cost when the migration was
	// scheduled; compare with actual.
	// +optional
	Predicted *MigrationCost `json:"predicted,omitempty"`
	// actual is the cost measured when the migration succeeded, in the
	// same terms as predicted.
	// +optional
	Actual *MigrationCost `json:"actual,omitempty"`
}

// VMMigration moves a running XenDomain to another XenHost.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=vmm;vmmig,categories=xenferry
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Domain",type=string,JSONPath=`.spec.domain`
// +kubebuilder:printcolumn:name="Source",type=string,JSONPath=`.status.sourceHost`
// +kubebuilder:printcolumn:name="Target",type=string,JSONPath=`.status.targetHost`
// +kubebuilder:printcolumn:name="Progress",type=string,JSONPath=`.status.progressText`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.failureReason`,priority=1
// +kubebuilder:printcolumn:name="Priority",type=string,JSONPath=`.spec.priority`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type VMMigration struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec is the requested migration.
	// +required
	Spec VMMigrationSpec `json:"spec"`
	// status is observed.
	// +optional
	Status VMMigrationStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// VMMigrationList is a list of VMMigrations.
type VMMigrationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VMMigration `json:"items"`
}

// SealedTokens is one random token, sealed once per agent (pkg/pki.Seal).
// The controller keeps no cleartext copy.
type SealedTokens struct {
	// source is the token sealed to the source host's certificate key.
	// +kubebuilder:validation:MaxLength=4096
	Source []byte `json:"source"`
	// target is the token sealed to the target host's certificate key.
	// +kubebuilder:validation:MaxLength=4096
	Target []byte `json:"target"`
	// sourceCertSerial and targetCertSerial name the certificates whose
	// keys the token was sealed to (hex serial numbers), for diagnosis.
	// +optional
	SourceCertSerial string `json:"sourceCertSerial,omitempty"`
	// +optional
	TargetCertSerial string `json:"targetCertSerial,omitempty"`
}
