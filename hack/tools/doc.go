// Package tools pins the build-time tools of xenferry (kube-apiserver for
// envtest and the demo). It is a separate module so that the product's
// go.mod stays free of k8s.io/kubernetes. hack/tools.sh builds from it.
package tools
