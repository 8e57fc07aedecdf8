package v1alpha1

// Condition types of a VMMigration and their reasons. The controller owns
// every condition; it derives them from the spec and the agents' halves.
const (
	// ValidCondition: the spec and the objects it names allow the migration.
	ValidCondition = "Valid"
	// ReasonValidated: domain, hosts and parameters check out.
	ReasonValidated = "Validated"
	// ReasonDomainNotFound: no XenDomain of that name in the namespace.
	ReasonDomainNotFound = "DomainNotFound"
	// ReasonDomainNotRunning: the domain has no host or is not running.
	ReasonDomainNotRunning = "DomainNotRunning"
	// ReasonDomainBusy: another migration of the same domain is in progress.
	ReasonDomainBusy = "DomainBusy"
	// ReasonTargetNotFound: no XenHost of that name.
	ReasonTargetNotFound = "TargetNotFound"
	// ReasonTargetIsSource: the target is the host the domain runs on.
	ReasonTargetIsSource = "TargetIsSource"
	// ReasonInsufficientCapacity: the target lacks free memory.
	ReasonInsufficientCapacity = "InsufficientCapacity"
	// ReasonIncompatibleHosts: backends or hypervisor versions differ.
	ReasonIncompatibleHosts = "IncompatibleHosts"
	// ReasonUnsupportedStrategy: the hosts' data paths cannot carry the
	// strategy the spec demands (e.g. PostCopy between hosts without early
	// resume).
	ReasonUnsupportedStrategy = "UnsupportedStrategy"
	// ReasonTargetUnschedulable: the target is cordoned.
	ReasonTargetUnschedulable = "TargetUnschedulable"
	// ReasonPolicyNotFound: spec.policyRef names no MigrationPolicy.
	ReasonPolicyNotFound = "PolicyNotFound"

	// ScheduledCondition: a concurrency slot and a target host are held.
	ScheduledCondition = "Scheduled"
	// ReasonWaitingForSlot: a concurrency limit is reached; queued.
	ReasonWaitingForSlot = "WaitingForSlot"
	// ReasonNoTargetAvailable: no host fits; retried.
	ReasonNoTargetAvailable = "NoTargetAvailable"
	// ReasonWaitingForCertificate: the source or target agent has no
	// certificate to seal the migration's token to yet; retried.
	ReasonWaitingForCertificate = "WaitingForCertificate"
	// ReasonTargetSelected: a target host was chosen or confirmed.
	ReasonTargetSelected = "TargetSelected"

	// TargetReadyCondition: the target agent accepts this migration's data.
	TargetReadyCondition = "TargetReady"
	// ReasonWaitingForTargetAgent: the target agent has not reported yet.
	ReasonWaitingForTargetAgent = "WaitingForTargetAgent"
	// ReasonReceiverListening: the target reported its data endpoint.
	ReasonReceiverListening = "ReceiverListening"

	// TransferringCondition: the source agent moves memory.
	TransferringCondition = "Transferring"
	// ReasonWaitingForSourceAgent: the source agent has not started yet.
	ReasonWaitingForSourceAgent = "WaitingForSourceAgent"
	// ReasonTransferring: the source reported progress.
	ReasonTransferring = "Transferring"
	// ReasonTransferDone: the source reported completion.
	ReasonTransferDone = "TransferDone"

	// ResumedOnTargetCondition: the domain runs on the target. Once true,
	// the migration is past the point of no return: it cannot be cancelled
	// and the source must never resume the domain.
	ResumedOnTargetCondition = "ResumedOnTarget"
	// ReasonResumed: the target agent reported the resume.
	ReasonResumed = "Resumed"
	// ReasonNotResumed: the domain has not run on the target yet.
	ReasonNotResumed = "NotResumed"

	// CompletedCondition: the migration reached a final phase.
	CompletedCondition = "Completed"
	// ReasonSucceeded: source released, target complete.
	ReasonSucceeded = "Succeeded"
	// ReasonCancelled: spec.cancel was honoured.
	ReasonCancelled = "Cancelled"
	// ReasonCancelIgnored: cancel came after the point of no return.
	ReasonCancelIgnored = "CancelIgnoredPastPointOfNoReturn"
	// ReasonSourceFailed: the source agent reported a failure.
	ReasonSourceFailed = "SourceFailed"
	// ReasonTargetFailed: the target agent reported a failure.
	ReasonTargetFailed = "TargetFailed"
	// ReasonSourceAgentLost: the source XenHost heartbeat went stale.
	ReasonSourceAgentLost = "SourceAgentLost"
	// ReasonTargetAgentLost: the target XenHost heartbeat went stale.
	ReasonTargetAgentLost = "TargetAgentLost"
	// ReasonAgentRestarted: an agent restarted and could not resume its half.
	ReasonAgentRestarted = "AgentRestarted"
	// ReasonCompletionTimeout: the completion timeout passed.
	ReasonCompletionTimeout = "CompletionTimeout"
	// ReasonProgressTimeout: bytes sent did not grow for progressTimeout.
	ReasonProgressTimeout = "ProgressTimeout"
	// ReasonPreempted: an evacuation needed this rebalancing migration's
	// slot; it was cancelled before the point of no return.
	ReasonPreempted = "Preempted"
	// ReasonInvalid: validation failed; see the Valid condition.
	ReasonInvalid = "Invalid"
	// ReasonInProgress: not final yet.
	ReasonInProgress = "InProgress"
)

// Finalizer is held by the controller on every VMMigration until both
// agents let go of it (or are gone) and its sealed tokens are cleared.
const Finalizer = "migration.xenferry.io/finalizer"

// LabelMigration marks objects that belong to a migration.
const LabelMigration = "migration.xenferry.io/migration"

// Token roles: the role part of a sealed token's binding.
const (
	TokenRoleSource = "source"
	TokenRoleTarget = "target"
)
