#!/usr/bin/env bash
# hack/deploy-check.sh: the manifests a platform team applies must be ones a
# real API server accepts. On the local control plane (hack/controlplane.sh,
# bin/kube-apiserver + bin/etcd) it applies the CRDs, then runs a server-side
# dry run (`kubectl apply --dry-run=server`) of everything in config/default
# (rendered with `kubectl kustomize`) and of the samples: the API server
# decodes, defaults and validates each object (OpenAPI schemas, CRD schemas
# and CEL rules, admission policies' own type checks) without storing it. Any
# rejection fails the run. A control plane this script started is stopped
# again; one that was running is left running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '[deploy-check] %s\n' "$*"; }
command -v kubectl >/dev/null || { log "kubectl is not installed (Debian: kubernetes-client)"; exit 1; }

started=
if ! hack/controlplane.sh status >/dev/null 2>&1; then
	hack/controlplane.sh up
	started=1
fi
cleanup() { [ -z "$started" ] || hack/controlplane.sh down >/dev/null 2>&1 || true; }
trap cleanup EXIT
export KUBECONFIG="$ROOT/.xenferry/controlplane/kubeconfig"

out=$(mktemp -d)
trap 'rm -rf "$out"; cleanup' EXIT
kubectl kustomize config/default >"$out/default.yaml"
log "config/default renders to $(grep -c '^kind:' "$out/default.yaml") objects"

# The CRDs for real: the samples and the policies refer to their kinds. The
# namespace for real too: a dry-run Namespace is not there for the
# namespaced objects that follow it.
kubectl apply --server-side --force-conflicts -k config/crd >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f config/crd/bases >/dev/null
ns=$(awk '/^kind: Namespace$/{n=1} n && /^  name:/{print $2; exit}' "$out/default.yaml")
kubectl create namespace "${ns:-xenferry-system}" --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null

fail=0
dry() { # LABEL FILE-OR-DIR [kubectl flags]
	local label=$1
	shift
	if kubectl apply --dry-run=server --server-side --force-conflicts --field-manager=deploy-check "$@" >"$out/dry.log" 2>&1; then
		log "accepted: $label ($(grep -c 'serverside-applied\|created\|configured\|unchanged' "$out/dry.log") objects)"
	else
		log "REJECTED: $label"
		sed 's/^/    /' "$out/dry.log" >&2
		fail=1
	fi
}
dry config/default -f "$out/default.yaml"
# config/samples/sim holds the simulated hosts' files, not API objects.
dry config/samples -f config/samples
[ "$fail" = 0 ] || { log "the API server rejected manifests"; exit 1; }
log "ok: config/default and config/samples pass a server-side dry run"
