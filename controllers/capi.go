package controllers

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
)

// Cluster API: a Machine is deleted (scale-down, rolling upgrade) by
// draining its Node and then removing it; a pre-drain hook annotation on
// the Machine holds the drain until its owner removes it. xenferry keeps
// its hook on the Machine of every dom0 Node that runs domains that must
// move; when the Machine is being deleted it evacuates the host, and it
// removes the hook once the host is evacuated. The Machine is read as
// unstructured so that clusters without Cluster API need nothing: without
// the Machine kind, or without the Node annotations, this does nothing.

// Node annotations Cluster API sets, and the hook's key and owner value.
const (
	capiMachineAnnotation   = "cluster.x-k8s.io/machine"
	capiNamespaceAnnotation = "cluster.x-k8s.io/cluster-namespace"
	PreDrainHookAnnotation  = "pre-drain.delete.hook.machine.cluster.x-k8s.io/xenferry"
	preDrainHookOwner       = "xenferry-controller"
)

var machineGVK = schema.GroupVersionKind{Group: "cluster.x-k8s.io", Version: "v1beta1", Kind: "Machine"}

// machineOf reads the Cluster API Machine of a Node (nil if there is none
// or Cluster API is not installed).
func machineOf(ctx context.Context, r ctrl.Reader, node *corev1.Node) (*unstructured.Unstructured, error) {
	if node == nil {
		return nil, nil
	}
	name, ns := node.Annotations[capiMachineAnnotation], node.Annotations[capiNamespaceAnnotation]
	if name == "" || ns == "" {
		return nil, nil
	}
	m := &unstructured.Unstructured{}
	m.SetGroupVersionKind(machineGVK)
	if err := r.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, m); err != nil {
		if apierrors.IsNotFound(err) || meta.IsNoMatchError(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("get Cluster API Machine %s/%s of Node %s: %w", ns, name, node.Name, err)
	}
	return m, nil
}

// setPreDrainHook adds (hold) or removes the hook annotation on a Machine.
func setPreDrainHook(ctx context.Context, c ctrl.Client, m *unstructured.Unstructured, hold bool) error {
	ann := m.GetAnnotations()
	if _, has := ann[PreDrainHookAnnotation]; has == hold {
		return nil
	}
	patch := ctrl.MergeFrom(m.DeepCopy())
	if hold {
		if ann == nil {
			ann = map[string]string{}
		}
		ann[PreDrainHookAnnotation] = preDrainHookOwner
	} else {
		delete(ann, PreDrainHookAnnotation)
	}
	m.SetAnnotations(ann)
	if err := c.Patch(ctx, m, patch); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("set pre-drain hook on Machine %s/%s: %w", m.GetNamespace(), m.GetName(), err)
	}
	return nil
}
