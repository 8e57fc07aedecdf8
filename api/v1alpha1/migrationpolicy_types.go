package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MigrationPolicySelectors choose the migrations a policy applies to. An
// empty selector matches everything.
type MigrationPolicySelectors struct {
	// namespaceSelector matches the labels of the migration's namespace.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// domainSelector matches the labels of the XenDomain.
	// +optional
	DomainSelector *metav1.LabelSelector `json:"domainSelector,omitempty"`
}

// MigrationPolicySpec gives defaults to the migrations it selects. When
// several policies match, the one whose selectors name the most labels wins;
// ties go to the alphabetically first name.
type MigrationPolicySpec struct {
	// selectors choose the migrations.
	// +optional
	Selectors MigrationPolicySelectors `json:"selectors,omitempty"`
	// MigrationParameters are the defaults.
	MigrationParameters `json:",inline"`
}

// MigrationPolicy holds defaults for the VMMigrations it selects.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mp,categories=xenferry
// +kubebuilder:printcolumn:name="Bandwidth",type=string,JSONPath=`.spec.bandwidth`
// +kubebuilder:printcolumn:name="MaxDowntime",type=string,JSONPath=`.spec.maxDowntime`
// +kubebuilder:printcolumn:name="PostCopy",type=boolean,JSONPath=`.spec.allowPostCopy`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type MigrationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec holds selectors and defaults.
	// +required
	Spec MigrationPolicySpec `json:"spec"`
}

// +kubebuilder:object:root=true

// MigrationPolicyList is a list of MigrationPolicies.
type MigrationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []MigrationPolicy `json:"items"`
}
