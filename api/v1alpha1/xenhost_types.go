package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// XenHost condition types.
const (
	// HostAgentReadyCondition: the agent runs and heartbeats.
	HostAgentReadyCondition = "AgentReady"
	// HostBackendReadyCondition: the agent reached its hypervisor backend.
	HostBackendReadyCondition = "BackendReady"
	// HostDrainingCondition: the host is being evacuated (spec.drain, its
	// Node cordoned, or its Cluster API Machine being deleted). The
	// controller owns it.
	HostDrainingCondition = "Draining"
	// HostEvacuatedCondition: no domain that must move is left on the host;
	// True only while a drain is requested.
	HostEvacuatedCondition = "Evacuated"
)

// Why a host drains (XenHost status.drain.reason).
const (
	DrainReasonRequested      = "DrainRequested"  // spec.drain
	DrainReasonNodeCordoned   = "NodeCordoned"    // the Node of its dom0 is unschedulable (kubectl cordon/drain)
	DrainReasonMachineDeleted = "MachineDeleting" // its Cluster API Machine is being deleted
)

// XenHostSpec is what an administrator sets on a host.
type XenHostSpec struct {
	// unschedulable (cordon) keeps the controller from choosing this host as
	// a target; an explicit spec.targetHost is refused too.
	// +optional
	Unschedulable bool `json:"unschedulable,omitempty"`
	// drain asks the controller to evacuate the host: no new migrations
	// arrive, and every domain is live-migrated away within the concurrency
	// limits (maintenance mode). Setting it back to false undoes the drain:
	// no new evacuation starts and those not past the point of no return
	// are cancelled. Cordoning the host's Node has the same effect.
	// +optional
	Drain bool `json:"drain,omitempty"`
}

// HostLoad is what a host's domains use, measured by its agent.
type HostLoad struct {
	// memoryUsedBytes is the memory the host's domains hold.
	// +optional
	MemoryUsedBytes int64 `json:"memoryUsedBytes,omitempty"`
	// cpuMillis is the CPU the domains' vCPUs used, in thousandths of a
	// CPU, averaged by the agent over about a minute (exponentially).
	// +optional
	CPUMillis int64 `json:"cpuMillis,omitempty"`
	// time the sample was taken.
	// +optional
	Time *metav1.Time `json:"time,omitempty"`
}

// BlockedDomain is a domain a drain cannot move, and why.
type BlockedDomain struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// reason says why and what to do about it.
	Reason string `json:"reason"`
}

// DrainStatus is the progress and result of a host's evacuation. The
// controller owns it.
type DrainStatus struct {
	// reason the drain started: DrainRequested, NodeCordoned or
	// MachineDeleting.
	Reason string `json:"reason"`
	// startTime of the drain.
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`
	// completionTime is when the host was found empty of domains that must move.
	// +optional
	CompletionTime *metav1.Time `json:"completionTime,omitempty"`
	// domains on the host when last counted (those left to move).
	// +optional
	Domains int32 `json:"domains,omitempty"`
	// migrating: evacuation migrations in progress.
	// +optional
	Migrating int32 `json:"migrating,omitempty"`
	// migrated: evacuation migrations that succeeded.
	// +optional
	Migrated int32 `json:"migrated,omitempty"`
	// failed: evacuation migrations that failed (each is retried).
	// +optional
	Failed int32 `json:"failed,omitempty"`
	// blocked lists the domains that cannot move now, with the reason.
	// +optional
	// +kubebuilder:validation:MaxItems=256
	Blocked []BlockedDomain `json:"blocked,omitempty"`
	// leftBehind lists domains whose evacuationStrategy lets them be shut
	// down with the host instead of moving.
	// +optional
	// +kubebuilder:validation:MaxItems=256
	LeftBehind []BlockedDomain `json:"leftBehind,omitempty"`
}

// XenHostStatus is published by the host's agent and kept fresh.
type XenHostStatus struct {
	// backend is "sim" or "xen".
	// +optional
	Backend string `json:"backend,omitempty"`
	// version of the hypervisor.
	// +optional
	Version string `json:"version,omitempty"`
	// agentVersion of the node agent.
	// +optional
	AgentVersion string `json:"agentVersion,omitempty"`
	// agentID identifies the agent process; it changes on restart.
	// +optional
	AgentID string `json:"agentID,omitempty"`
	// cpus of the host.
	// +optional
	CPUs int32 `json:"cpus,omitempty"`
	// capacityBytes is the host memory available to domains.
	// +optional
	CapacityBytes int64 `json:"capacityBytes,omitempty"`
	// freeBytes is the memory not used by domains.
	// +optional
	FreeBytes int64 `json:"freeBytes,omitempty"`
	// domains running on the host.
	// +optional
	Domains int32 `json:"domains,omitempty"`
	// dataAddress is the agent's migration endpoint (host:port).
	// +optional
	DataAddress string `json:"dataAddress,omitempty"`
	// tls is the host's certificate exchange: the agent publishes a CSR,
	// the controller answers with a certificate and the CA bundle.
	// +optional
	TLS *HostTLS `json:"tls,omitempty"`
	// capabilities of this host's data path, from its backend; the
	// controller runs between two hosts only what both can.
	// +optional
	Capabilities *HostCapabilities `json:"capabilities,omitempty"`
	// heartbeatTime is refreshed by the agent; a stale heartbeat means the
	// agent is gone and its migrations fail safe.
	// +optional
	HeartbeatTime *metav1.Time `json:"heartbeatTime,omitempty"`
	// load the host's domains put on it, from the agent.
	// +optional
	Load *HostLoad `json:"load,omitempty"`
	// drain is the evacuation's progress, from the controller.
	// +optional
	Drain *DrainStatus `json:"drain,omitempty"`
	// conditions: AgentReady, BackendReady (agent); Draining, Evacuated
	// (controller).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// HostTLS carries an agent's certificate request and the controller's
// answer. The agent writes csr only; the controller writes the rest.
type HostTLS struct {
	// csr is the agent's PEM certificate request: CommonName = this
	// XenHost's name, an ECDSA P-256 key the agent keeps on its host.
	// +optional
	// +kubebuilder:validation:MaxLength=8192
	CSR string `json:"csr,omitempty"`
	// certificate is the PEM certificate the controller issued for csr.
	// +optional
	// +kubebuilder:validation:MaxLength=16384
	Certificate string `json:"certificate,omitempty"`
	// caBundle is the PEM bundle of CAs agents trust for their peers (the
	// current CA, and the previous one while certificates move over).
	// +optional
	// +kubebuilder:validation:MaxLength=65536
	CABundle string `json:"caBundle,omitempty"`
	// notAfter is when certificate expires; the controller renews it at
	// two thirds of its lifetime.
	// +optional
	NotAfter *metav1.Time `json:"notAfter,omitempty"`
}

// XenHost is one dom0 running a node agent. Cluster-scoped, named after the
// host, created and kept fresh by the agent.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=xh,categories=xenferry
// +kubebuilder:printcolumn:name="Backend",type=string,JSONPath=`.status.backend`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="AgentReady")].status`
// +kubebuilder:printcolumn:name="Free",type=integer,JSONPath=`.status.freeBytes`
// +kubebuilder:printcolumn:name="Capacity",type=integer,JSONPath=`.status.capacityBytes`
// +kubebuilder:printcolumn:name="Domains",type=integer,JSONPath=`.status.domains`
// +kubebuilder:printcolumn:name="Cordoned",type=boolean,JSONPath=`.spec.unschedulable`
// +kubebuilder:printcolumn:name="Draining",type=string,JSONPath=`.status.conditions[?(@.type=="Draining")].status`
// +kubebuilder:printcolumn:name="CPU(m)",type=integer,JSONPath=`.status.load.cpuMillis`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type XenHost struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec is set by administrators.
	// +optional
	Spec XenHostSpec `json:"spec,omitempty"`
	// status is published by the agent.
	// +optional
	Status XenHostStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// XenHostList is a list of XenHosts.
type XenHostList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []XenHost `json:"items"`
}

// HostCapabilities say which migrations a host's data path can carry.
type HostCapabilities struct {
	// transport moves the memory: "engine" (xenferry's engine: pre-copy,
	// post-copy, hybrid) or "xl" (stock `xl migrate` through xenferry's
	// transport, pre-copy only).
	Transport string `json:"transport"`
	// strategies the host can run.
	// +optional
	// +listType=set
	Strategies []MigrationStrategy `json:"strategies,omitempty"`
	// dedup: pages equal to blocks of the domain's shared disk can go as
	// references.
	// +optional
	Dedup bool `json:"dedup,omitempty"`
	// earlyResume: the domain can run on this host before all its memory
	// arrived (PostCopy, and Hybrid's switch to post-copy).
	// +optional
	EarlyResume bool `json:"earlyResume,omitempty"`
	// compression lists the codecs of compressed page batches this host's
	// data path decodes. A source compresses (adaptively, batch by batch)
	// only towards a host that lists the codec.
	// +optional
	// +listType=set
	Compression []PageCodec `json:"compression,omitempty"`
}

// PageCodec names a compression of page batches on the wire.
// +kubebuilder:validation:Enum=zstd
type PageCodec string

// PageCodecZstd: a batch's pages as one zstd frame.
const PageCodecZstd PageCodec = "zstd"
