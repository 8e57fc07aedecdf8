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
)

// XenHostSpec is what an administrator sets on a host.
type XenHostSpec struct {
	// unschedulable (cordon) keeps the controller from choosing this host as
	// a target; an explicit spec.targetHost is refused too.
	// +optional
	Unschedulable bool `json:"unschedulable,omitempty"`
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
	// conditions: AgentReady, BackendReady.
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
}
