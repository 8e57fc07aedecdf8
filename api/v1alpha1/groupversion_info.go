// Package v1alpha1 is the migration.xenferry.io/v1alpha1 API: VMMigration,
// XenDomain, XenHost and MigrationPolicy. It imports apimachinery only; the
// controller and the node agent both build on it.
//
// +kubebuilder:object:generate=true
// +groupName=migration.xenferry.io
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the group and version of this API.
var GroupVersion = schema.GroupVersion{Group: "migration.xenferry.io", Version: "v1alpha1"}

var (
	// SchemeBuilder registers the types of this package.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds the types of this package to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&VMMigration{}, &VMMigrationList{},
		&XenDomain{}, &XenDomainList{},
		&XenHost{}, &XenHostList{},
		&MigrationPolicy{}, &MigrationPolicyList{},
		&RebalancePolicy{}, &RebalancePolicyList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
