// Package agent is xenferry's node agent: everything node-agent does, the
// command line aside (package main in node-agent wires the commands).
//
// Under Kubernetes (`node-agent run`) an Agent (New, Run) publishes its
// XenHost and the XenDomains of its host (publish.go: inventory, load and
// predicted migration cost, load.go), indexes the domains' disks ahead of
// need (index.go) and runs this host's halves of VMMigrations, after
// KubeVirt's migration source and target controllers:
//
//   - SourceReconciler (source.go) owns status.source: it runs the outgoing
//     transfer of a domain of this host, holds a domain committed to the
//     target until the target's verdict, and adopts what a previous process
//     left;
//   - TargetReconciler (target.go, grant.go) owns status.target: it admits
//     only the migration the controller granted (token and peer), receives
//     it and reports prepared, resumed and completed.
//
// One controller-runtime controller watches the VMMigrations of this host
// and hands each to the reconciler of the host's role in it (migrate.go);
// each writes only its half, with a JSON patch that leaves the rest alone.
//
// Both halves have two data paths, picked by the backend's transport: the
// engine (pkg/engine; the sim backend) and the stock toolstack, `xl
// migrate` with this package's xl transport (xl_migrate.go, xl_agent.go,
// xl_transport.go). Incoming connections are mutual TLS with a certificate
// the controller issues (tls.go); in-flight state survives a restart
// (state.go).
//
// The dedup-index cache (diskIndexes, backend.go) is one for every command:
// `run` and `serve` keep it open and persisted under STATEDIR/index, where
// `xl-send` and `xl-index` load it.
//
// The standalone commands (Serve, Migrate, Resolve, XLSend, XLRecv,
// XLIndex, PKI, Inventory, SimDestroy) take their flags as arguments.
package agent
