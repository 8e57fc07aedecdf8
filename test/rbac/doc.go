// Package rbac holds no code: its tests install the deployment's RBAC
// (config/rbac) and admission policies (config/policy) into a real
// kube-apiserver (envtest) and check, by impersonating the controller's and
// the node agents' ServiceAccounts, what each may and may not do; and that
// the controller's metrics endpoint admits only authorized scrapers.
package rbac
