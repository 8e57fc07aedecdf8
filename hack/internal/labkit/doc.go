// Package labkit is what the lab harnesses under hack/ (hack/faults, the
// cross-host fault matrix, and hack/fleet, the drain and rebalance fleet)
// share: starting and stopping the processes of a run, a throwaway control
// plane (etcd and kube-apiserver from bin/), building the binaries under
// test, polling the API, and observing simulated guests from /proc.
//
// The harnesses judge the product from facts it cannot fake (which guest
// processes run, what their memory holds), so the code that gathers those
// facts must be one piece of code: a fix to it must reach both judges. What
// differs between the harnesses (network namespaces, how guests are
// attributed to hosts, which API errors a wait retries, how memory is
// compared) stays in each harness, on top of this package.
//
// Everything here is for test harnesses that run as root on a lab machine;
// nothing here is part of the product.
package labkit
