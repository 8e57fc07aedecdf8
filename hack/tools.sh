#!/usr/bin/env bash
# hack/tools.sh builds the operator's tooling into bin/ from the Go module
# proxy only (no download sites are reachable, so setup-envtest cannot be used):
#
#   bin/kube-apiserver  k8s.io/kubernetes v1.37.2 (module hack/tools, staging replaces)
#   bin/etcd            go.etcd.io/etcd/server/v3 v3.7.3 (module hack/tools/etcd)
#   bin/controller-gen  sigs.k8s.io/controller-tools v0.23.0
#
# Idempotent: a tool whose `bin/X --version` already reports the wanted
# version is skipped, so a warm run takes well under a second. A cold run
# takes ~10 minutes on 2 cores (mostly kube-apiserver) and ~3.5 GB of Go
# caches. Usage: hack/tools.sh [kube-apiserver|etcd|controller-gen]...
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/bin"
TOOLS="$ROOT/hack/tools"
export GOTOOLCHAIN=local
export GOFLAGS=-buildvcs=false
NICE=${XF_TOOLS_NICE:-nice -n 10}

KUBE_VERSION=v1.37.2
STAGING_VERSION=v0.37.2
ETCD_SERVER_VERSION=v3.7.3
CONTROLLER_TOOLS_VERSION=v0.23.0

mkdir -p "$BIN"
start_all=$(date +%s)
log() { printf '[tools %3ds] %s\n' "$(( $(date +%s) - start_all ))" "$*"; }

# Serialise concurrent runs (make test and make demo may start together).
exec 9>"$BIN/.tools.lock"
if ! flock -n 9; then
	log "another hack/tools.sh is running; waiting for it"
	flock 9
fi

# run_progress LABEL CMD... runs CMD, printing an elapsed-time line every 30 s
# so a long cold build is visibly alive; CMD's output goes to a log file that
# is shown only when it fails.
run_progress() {
	local label=$1; shift
	local logf="$BIN/.build-$label.log" t0 pid rc
	t0=$(date +%s)
	"$@" >"$logf" 2>&1 &
	pid=$!
	while kill -0 "$pid" 2>/dev/null; do
		for _ in $(seq 30); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "  $label: still building ($(( $(date +%s) - t0 ))s elapsed)"
		fi
	done
	rc=0
	wait "$pid" || rc=$?
	if [ "$rc" -ne 0 ]; then
		log "  $label: FAILED (exit $rc); last lines of $logf:"
		tail -n 30 "$logf" >&2
		log "  fix the error above and rerun hack/tools.sh (partial downloads are cached)"
		exit "$rc"
	fi
	log "  $label: done in $(( $(date +%s) - t0 ))s"
}

# have TOOL PATTERN: true when bin/TOOL --version output contains PATTERN.
# The output is read whole: with pipefail, `--version | grep -q` fails
# whenever grep exits before the tool's last write (SIGPIPE), which rebuilt
# an up-to-date tool on a loaded machine.
have() {
	local out
	[ -x "$BIN/$1" ] && out=$("$BIN/$1" --version 2>/dev/null) && [[ $out == *"$2"* ]]
}

build_controller_gen() {
	if have controller-gen "$CONTROLLER_TOOLS_VERSION"; then
		log "controller-gen $CONTROLLER_TOOLS_VERSION: up to date"
		return
	fi
	log "controller-gen $CONTROLLER_TOOLS_VERSION: building (cold ~1 min)"
	run_progress controller-gen env GOBIN="$BIN" $NICE go install \
		"sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
}

build_etcd() {
	if have etcd "etcd Version: ${ETCD_SERVER_VERSION#v}"; then
		log "etcd $ETCD_SERVER_VERSION: up to date"
		return
	fi
	log "etcd $ETCD_SERVER_VERSION: building (cold ~1.5 min)"
	(
		cd "$TOOLS/etcd"
		if [ ! -f go.mod ]; then
			go mod init github.com/xenferry/xenferry/hack/tools/etcd >/dev/null 2>&1
		fi
		if ! grep -q "go.etcd.io/etcd/server/v3 $ETCD_SERVER_VERSION" go.mod; then
			log "  etcd: resolving go.etcd.io/etcd/server/v3@$ETCD_SERVER_VERSION"
			go get "go.etcd.io/etcd/server/v3@$ETCD_SERVER_VERSION" >/dev/null
			go mod tidy >/dev/null
		fi
		run_progress etcd $NICE go build -trimpath -ldflags '-s -w' -o "$BIN/etcd" .
	)
}

build_kube_apiserver() {
	if have kube-apiserver "Kubernetes $KUBE_VERSION"; then
		log "kube-apiserver $KUBE_VERSION: up to date"
		return
	fi
	log "kube-apiserver $KUBE_VERSION: building (cold ~8 min on 2 cores, 2.5 GB RAM)"
	(
		cd "$TOOLS"
		if [ ! -f go.mod ]; then
			go mod init github.com/xenferry/xenferry/hack/tools >/dev/null 2>&1
		fi
		if ! grep -q "k8s.io/kubernetes $KUBE_VERSION" go.mod; then
			# k8s.io/kubernetes requires its staging modules at v0.0.0 and
			# replaces them with local folders upstream; pin each one to the
			# published release instead.
			log "  kube-apiserver: pinning staging modules to $STAGING_VERSION"
			local kmod
			kmod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
				sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
			[ -f "$kmod" ] || { log "cannot find go.mod of k8s.io/kubernetes@$KUBE_VERSION"; exit 1; }
			local n=0 m
			for m in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$kmod" | sort -u); do
				go mod edit -replace "$m=$m@$STAGING_VERSION"
				n=$((n + 1))
			done
			log "  kube-apiserver: $n staging replaces; resolving dependencies"
			go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" >/dev/null
		fi
		local date ldflags="-s -w" p major minor
		date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
		major=$(echo "${KUBE_VERSION#v}" | cut -d. -f1)
		minor=$(echo "${KUBE_VERSION#v}" | cut -d. -f2)
		for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
			ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
			ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
		done
		run_progress kube-apiserver $NICE go build -trimpath -ldflags "$ldflags" \
			-o "$BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
	)
}

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(controller-gen etcd kube-apiserver)
for t in "${want[@]}"; do
	case "$t" in
	controller-gen) build_controller_gen ;;
	etcd) build_etcd ;;
	kube-apiserver) build_kube_apiserver ;;
	*) log "unknown tool $t (want controller-gen, etcd or kube-apiserver)"; exit 2 ;;
	esac
done
log "tools ready in $BIN ($(( $(date +%s) - start_all ))s)"
