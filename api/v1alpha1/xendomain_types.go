package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// DomainDisk is one virtual disk of a domain.
type DomainDisk struct {
	// id names the disk within the domain (xvda, ...).
	// +required
	ID string `json:"id"`
	// path of the image on shared storage.
	// +required
	Path string `json:"path"`
	// readOnly disks are never written by the guest.
	// +optional
	ReadOnly bool `json:"readOnly,omitempty"`
}

// XenDomainSpec is the domain's configuration, as its host reports it.
type XenDomainSpec struct {
	// domainName is the name of the domain on its host (may differ from
	// metadata.name, which must be a DNS label).
	// +required
	DomainName string `json:"domainName"`
	// uuid of the domain.
	// +optional
	UUID string `json:"uuid,omitempty"`
	// memoryBytes of guest memory.
	// +optional
	MemoryBytes int64 `json:"memoryBytes,omitempty"`
	// vcpus of the domain.
	// +optional
	VCPUs int32 `json:"vcpus,omitempty"`
	// disks of the domain.
	// +optional
	// +listType=atomic
	Disks []DomainDisk `json:"disks,omitempty"`
}

// XenDomainStatus is where and how the domain runs.
type XenDomainStatus struct {
	// host is the XenHost the domain runs on; only that host's agent writes
	// this object.
	// +optional
	Host string `json:"host,omitempty"`
	// domID on that host.
	// +optional
	DomID int32 `json:"domID,omitempty"`
	// state: Running, Paused, Migrating, Shutdown.
	// +optional
	State string `json:"state,omitempty"`
	// lastUpdateTime by the agent.
	// +optional
	LastUpdateTime *metav1.Time `json:"lastUpdateTime,omitempty"`
	// diskIndexes is the progress of the dedup index of each of the
	// domain's disks on its host: the agent builds them when it finds the
	// domain, ahead of any migration.
	// +optional
	// +listType=map
	// +listMapKey=disk
	// +kubebuilder:validation:MaxItems=64
	DiskIndexes []DiskIndexStatus `json:"diskIndexes,omitempty"`
	// cpuMillis is the CPU the domain's vCPUs used, in thousandths of a
	// CPU, averaged by the agent over about a minute (exponentially).
	// +optional
	CPUMillis int64 `json:"cpuMillis,omitempty"`
	// predictedCost is what a live migration of this domain would cost
	// now, from a scan of its memory against its disks' dedup indexes and
	// its dirty rate; drains and rebalancing plan with it.
	// +optional
	PredictedCost *MigrationCost `json:"predictedCost,omitempty"`
}

// MigrationCost predicts (or records) what a migration puts on the link
// and how long it takes.
type MigrationCost struct {
	// bytes on the link.
	Bytes int64 `json:"bytes"`
	// time from start to completion.
	Time metav1.Duration `json:"time"`
	// pages of the domain, and of those: zero pages (never sent) and pages
	// equal to a block of the domain's disks (sent as references).
	// +optional
	Pages uint64 `json:"pages,omitempty"`
	// +optional
	ZeroPages uint64 `json:"zeroPages,omitempty"`
	// +optional
	DiskPages uint64 `json:"diskPages,omitempty"`
	// dirtyRate is the guest's page-dirtying rate in bytes per second.
	// +optional
	DirtyRate int64 `json:"dirtyRate,omitempty"`
	// linkRate is the throughput the prediction assumed, bytes per second.
	// +optional
	LinkRate int64 `json:"linkRate,omitempty"`
	// scanTime is when memory was last scanned.
	// +optional
	ScanTime *metav1.Time `json:"scanTime,omitempty"`
}

// Evacuation strategies (label or annotation EvacuationStrategyKey on a
// XenDomain), after KubeVirt's evictionStrategy.
const (
	// EvacuationStrategyKey selects what a drain does with the domain.
	EvacuationStrategyKey = "migration.xenferry.io/evacuation-strategy"
	// EvacuateLiveMigrate (the default): the domain must move; a drain
	// waits for it and reports it blocked while it cannot.
	EvacuateLiveMigrate = "LiveMigrate"
	// EvacuateLiveMigrateIfPossible: the drain tries to move the domain;
	// if no host can take it, the domain is left to be shut down with its
	// host and does not hold the drain.
	EvacuateLiveMigrateIfPossible = "LiveMigrateIfPossible"
	// EvacuateNone: the domain is never moved by a drain; it is left to be
	// shut down with its host.
	EvacuateNone = "None"
	// AntiAffinityKey: domains with the same value of this label are kept
	// on different hosts by drains and rebalancing.
	AntiAffinityKey = "migration.xenferry.io/anti-affinity"
)

// DiskIndexStatus is the dedup index of one disk of a domain.
type DiskIndexStatus struct {
	// disk is the disk's id in the domain (its virtual device).
	// +kubebuilder:validation:MaxLength=64
	Disk string `json:"disk"`
	// percent of the disk read into the index.
	// +optional
	Percent int32 `json:"percent,omitempty"`
	// ready: the index is built and persisted; migrations use it.
	// +optional
	Ready bool `json:"ready,omitempty"`
	// message says why the disk could not be indexed (its pages then
	// cross in full).
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	Message string `json:"message,omitempty"`
}

// XenDomain is one Xen domain, published by the agent of the host it runs
// on, in the namespace its configuration names (else the agent's default).
// Namespaces and RBAC decide who may migrate it.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=xd,categories=xenferry
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.status.host`
// +kubebuilder:printcolumn:name="State",type=string,JSONPath=`.status.state`
// +kubebuilder:printcolumn:name="Memory",type=integer,JSONPath=`.spec.memoryBytes`
// +kubebuilder:printcolumn:name="VCPUs",type=integer,JSONPath=`.spec.vcpus`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type XenDomain struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec is the domain's configuration.
	// +required
	Spec XenDomainSpec `json:"spec"`
	// status is where it runs.
	// +optional
	Status XenDomainStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// XenDomainList is a list of XenDomains.
type XenDomainList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []XenDomain `json:"items"`
}
