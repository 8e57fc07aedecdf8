#!/usr/bin/env bash
# hack/demo.sh (make demo): xenferry end to end on one machine.
#
#  1. a standalone live migration between two simulated hosts (seconds),
#     while the control-plane tools build behind it on a fresh machine;
#  2. a local control plane (bin/etcd + bin/kube-apiserver on loopback);
#  3. the CRDs, the controller and two node agents on simulated hosts
#     (config/samples/sim/), each with domains running workloads;
#  4. `kubectl apply -f config/samples/`, live progress, a result table;
#  5. a drain of the host that then runs the domains, shown live by the
#     kubectl plugin (`kubectl xenferry drain HOST --watch`), then undone.
#
# Exits 0 only if every sample VMMigration Succeeded and the drain emptied
# the host. Everything it started
# is stopped on exit or Ctrl-C. Logs: .xenferry/demo/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export GOTOOLCHAIN=local
DEMO="$ROOT/.xenferry/demo"
BIN="$ROOT/bin"
TIMEOUT=${XF_DEMO_TIMEOUT:-300}
mkdir -p "$DEMO"
T0=$(date +%s)
PIDS=()
TOOLS_PID=""

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { printf '\n[demo %3ss] %s\n' "$(elapsed)" "$*"; }
info() { printf '[demo %3ss]   %s\n' "$(elapsed)" "$*"; }

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ ${#PIDS[@]} -gt 0 ]; then
		info "stopping the controller and the agents"
		for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
		for p in "${PIDS[@]}"; do
			for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
			kill -9 "$p" 2>/dev/null || true
		done
	fi
	if [ -n "$TOOLS_PID" ] && kill -0 "$TOOLS_PID" 2>/dev/null; then
		info "stopping the tools build (rerun to continue; finished parts are cached)"
		kill -- "-$TOOLS_PID" 2>/dev/null || kill "$TOOLS_PID" 2>/dev/null || true
	fi
	sim_destroy
	"$ROOT/hack/controlplane.sh" down >/dev/null 2>&1 || true
	info "cleaned up; logs in $DEMO"
	exit "$rc"
}
# The simulated domains' guests outlive their agents, as domUs outlive a
# dom0 agent: each demo starts from fresh simulated hosts and ends them.
sim_destroy() {
	[ -x "$BIN/node-agent" ] || return 0
	for h in a b; do "$BIN/node-agent" sim-destroy --state-dir "$DEMO/agent-dom0-$h" 2>/dev/null || true; done
}
trap cleanup EXIT
on_signal() { exit 130; }
trap on_signal INT TERM

# tools_ready reads each --version output whole: with pipefail, piping it
# into grep -q can fail on SIGPIPE and start a needless rebuild.
tools_ready() {
	local a e
	a=$("$BIN/kube-apiserver" --version 2>/dev/null) && [[ $a == *"Kubernetes v1.37.2"* ]] &&
		e=$("$BIN/etcd" --version 2>/dev/null) && [[ $e == *"etcd Version: 3.7.3"* ]]
}

# ---- 1. tools behind, a standalone migration in front ----
say "1/6 tools for the local control plane"
if tools_ready; then
	info "bin/kube-apiserver and bin/etcd are built"
else
	info "building kube-apiserver and etcd from the Go module proxy in the background"
	info "(first run only: ~10-15 min on 2 cores; progress in $DEMO/tools.log)"
	setsid nice -n 10 "$ROOT/hack/tools.sh" etcd kube-apiserver >"$DEMO/tools.log" 2>&1 &
	TOOLS_PID=$!
fi

say "2/6 a live migration without Kubernetes: two simulated hosts, real TCP, a 256 MiB web server VM"
info "go run ./hack/migbench -scenario web -strategy hybrid+dedup -memory 256Mi"
nice -n 5 go run ./hack/migbench -scenario web -strategy hybrid+dedup -memory 256Mi -workdir "$ROOT/.xenferry/migbench"
info "first live migration done at $(elapsed)s"

if [ -n "$TOOLS_PID" ]; then
	say "waiting for the tools build"
	while kill -0 "$TOOLS_PID" 2>/dev/null; do
		sleep 15
		info "$(tail -n 1 "$DEMO/tools.log" 2>/dev/null)"
	done
	wait "$TOOLS_PID" || { info "the tools build failed; see $DEMO/tools.log"; TOOLS_PID=""; exit 1; }
	TOOLS_PID=""
	info "tools built at $(elapsed)s"
fi

# ---- 2. control plane ----
say "3/6 local control plane, CRDs, controller, two agents"
info "building bin/xenferry-controller and bin/node-agent while the control plane starts"
# The control plane starts while the two binaries build (it mostly waits
# on etcd and the API server); the kubectl plugin, needed only for the
# drain at the end, builds behind the sample migrations.
"$ROOT/hack/controlplane.sh" up >"$DEMO/controlplane.log" 2>&1 &
CP_PID=$!
go build -o "$BIN/xenferry-controller" .
go build -o "$BIN/node-agent" ./node-agent
wait "$CP_PID" || { info "the control plane did not start:"; tail -n 20 "$DEMO/controlplane.log"; exit 1; }
sed 's/^/            /' "$DEMO/controlplane.log"
nice -n 5 go build -o "$BIN/kubectl-xenferry" ./cmd/kubectl-xenferry >"$DEMO/plugin-build.log" 2>&1 &
PLUGIN_PID=$!
# kubectl finds its plugins on PATH: `kubectl xenferry` is bin/kubectl-xenferry.
export PATH="$BIN:$PATH"
export KUBECONFIG="$ROOT/.xenferry/controlplane/kubeconfig"
KUBECTL=${KUBECTL:-kubectl}
command -v "$KUBECTL" >/dev/null || { info "kubectl is not installed (apt-get install kubectl, or set KUBECTL)"; exit 1; }
# Every call is bounded: a kubectl waiting on a dying API server must not
# hold the progress loop (or the clean-up behind it).
k() { "$KUBECTL" --request-timeout=20s "$@" 2>&1 | grep -v "^WARNING: version difference" || true; }
kq() { "$KUBECTL" --request-timeout=20s "$@" 2>/dev/null; }
k apply -f config/crd/bases | sed 's/^/            /'
"$KUBECTL" wait --for condition=established --timeout 60s crd --all >/dev/null 2>&1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
MPORT=$(free_port)
# The controller and the agents run in sessions of their own (setsid execs
# them, so $! is their pid): a Ctrl-C reaches this script alone, and the
# clean-up stops them before the control plane they talk to.
setsid "$BIN/xenferry-controller" --kubeconfig "$KUBECONFIG" --ca-namespace default --metrics-bind-address "127.0.0.1:$MPORT" \
	--health-probe-bind-address 0 >"$DEMO/controller.log" 2>&1 &
PIDS+=($!)
info "controller started (pid $!, metrics on https://127.0.0.1:$MPORT, log $DEMO/controller.log)"
sim_destroy
for h in a b; do
	setsid "$BIN/node-agent" run --kubeconfig "$KUBECONFIG" --backend sim --sim-config "config/samples/sim/sim-host-$h.yaml" \
		--data-addr 127.0.0.1:0 --state-dir "$DEMO/agent-dom0-$h" >"$DEMO/agent-dom0-$h.log" 2>&1 &
	PIDS+=($!)
	info "agent dom0-$h started (pid $!, log $DEMO/agent-dom0-$h.log)"
done
info "waiting for both XenHosts and the three XenDomains (the first run generates disk images)"
for i in $(seq 240); do
	hosts=$(kq get xenhosts -o name | wc -l)
	doms=$(kq get xendomains -A -o name | wc -l)
	[ "$hosts" -ge 2 ] && [ "$doms" -ge 3 ] && break
	for p in "${PIDS[@]}"; do
		kill -0 "$p" 2>/dev/null || { info "a process exited early; see the logs in $DEMO"; tail -n 5 "$DEMO"/*.log; exit 1; }
	done
	sleep 0.5
done
k get xenhosts | sed 's/^/            /'
k get xendomains -A | sed 's/^/            /'

# ---- 3. the sample migrations ----
say "4/6 kubectl apply -f config/samples/"
k apply -f config/samples/ | sed 's/^/            /'
NAMES=$(kq get vmmigrations -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
N=$(echo "$NAMES" | grep -c . || true)
START=$(date +%s)

fmt_dur() { # a Go duration (1.5s, 308.2ms, 950µs, 1m2.5s) rounded for the table
	awk -v d="${1:-}" 'BEGIN {
		if (d == "") { print "-"; exit }
		s = 0; rest = d
		while (match(rest, /^[0-9.]+(h|ms|us|µs|ns|m|s)/)) {
			tok = substr(rest, 1, RLENGTH); rest = substr(rest, RLENGTH + 1)
			match(tok, /^[0-9.]+/); v = substr(tok, 1, RLENGTH) + 0; u = substr(tok, RLENGTH + 1)
			if (u == "h") s += v * 3600; else if (u == "m") s += v * 60; else if (u == "s") s += v
			else if (u == "ms") s += v / 1e3; else if (u == "ns") s += v / 1e9; else s += v / 1e6
		}
		if (s >= 1) printf "%.2f s", s; else printf "%.0f ms", s * 1000
	}'
}
fmt_bytes() { awk -v b="${1:-0}" 'BEGIN { if (b == "") b = 0; printf "%.1f MiB", b / 1048576 }'; }
snapshot() {
	kq get vmmigrations -o jsonpath='{range .items[*]}{.metadata.name}{"|"}{.status.phase}{"|"}{.status.progress.percent}{"|"}{.status.progress.transferRate}{"|"}{.status.progress.pages.disk}{"|"}{.status.sourceHost}{"|"}{.status.targetHost}{"\n"}{end}'
}
# One line per migration when its phase or quarter of progress changes
# (the live bar of one migration is `kubectl xenferry status NAME --watch`).
declare -A LAST
while :; do
	snap=$(snapshot || true)
	final=0
	while IFS='|' read -r name phase pct rate disk src dst; do
		[ -n "$name" ] || continue
		pct=${pct:-0}
		case "$phase" in Succeeded|Failed|Cancelled) final=$((final + 1)) ;; esac
		[ "$phase" = Succeeded ] && pct=100
		key="${phase}/$((pct / 25))"
		if [ "${LAST[$name]:-}" != "$key" ]; then
			LAST[$name]=$key
			printf '[demo %3ss]   %-16s phase=%-15s progress=%3s%%  rate=%s/s  dedup-saved=%s  %s -> %s\n' "$(elapsed)" "$name" "${phase:-Pending}" "$pct" \
				"$(fmt_bytes "$rate")" "$(fmt_bytes "$(( ${disk:-0} * 4096 ))")" "${src:-?}" "${dst:-?}"
		fi
	done <<<"$snap"
	[ "$final" -ge "$N" ] && [ "$N" -gt 0 ] && break
	if [ $(( $(date +%s) - START )) -gt "$TIMEOUT" ]; then
		info "not finished after ${TIMEOUT}s; kubectl describe:"
		k describe vmmigrations | tail -n 60
		break
	fi
	sleep 0.5
done
WALL=$(( $(date +%s) - START ))

# ---- 4. results ----
say "5/6 results (migrations took ${WALL}s from kubectl apply to the last final phase)"
k get vmmigrations | sed 's/^/            /'
echo
printf '            %-16s %-10s %-8s %-8s %10s %10s %12s %12s %9s %s\n' NAME PHASE SOURCE TARGET TOTAL DOWNTIME SENT DEDUP-SAVED POST-COPY REASON
kq get vmmigrations -o jsonpath='{range .items[*]}{.metadata.name}{"|"}{.status.phase}{"|"}{.status.sourceHost}{"|"}{.status.targetHost}{"|"}{.status.result.totalTime}{"|"}{.status.result.downtime}{"|"}{.status.result.bytesSent}{"|"}{.status.result.dedupSavedBytes}{"|"}{.status.result.postCopy}{"|"}{.status.failureReason}{"\n"}{end}' |
	while IFS='|' read -r name phase src dst total down sent saved post reason; do
		printf '            %-16s %-10s %-8s %-8s %10s %10s %12s %12s %9s %s\n' "$name" "$phase" "$src" "$dst" "$(fmt_dur "$total")" "$(fmt_dur "$down")" \
			"$(fmt_bytes "$sent")" "$(fmt_bytes "$saved")" "${post:-false}" "$reason"
	done
echo
k get xendomains -A | sed 's/^/            /'
# The metrics endpoint is HTTPS (a self-signed certificate) and admits a
# caller whose bearer token the API server accepts and who may GET /metrics:
# here the control plane's admin.
REC=$(curl -fsk -H "Authorization: Bearer $(cat "$ROOT/.xenferry/controlplane/token")" "https://127.0.0.1:$MPORT/metrics" | awk '/^xenferry_controller_reconciles_total/ {print $2}')
if [ -n "$REC" ] && [ "$N" -gt 0 ]; then
	info "controller reconciles: $REC for $N migrations ($(awk -v r="$REC" -v n="$N" 'BEGIN{printf "%.1f", r/n}') per migration)"
fi
info "conditions of one migration (kubectl describe vmmigration migrate-web-1, Status.Conditions):"
kq get vmmigration migrate-web-1 -o jsonpath='{range .status.conditions[*]}{.type}{"|"}{.status}{"|"}{.reason}{"|"}{.message}{"\n"}{end}' |
	while IFS='|' read -r typ st reason msg; do
		printf '            %-16s %-6s %-28s %s\n' "$typ" "$st" "$reason" "$msg"
	done
info "events of one migration (kubectl describe vmmigration migrate-web-1):"
k describe vmmigration migrate-web-1 | sed -n '/^Events:/,$p' | sed 's/^/            /'

ok=$(kq get vmmigrations -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Succeeded$' || true)
info "$ok of $N sample migrations Succeeded"

# ---- 5. a drain, live ----
# The host that now runs the most domains is evacuated onto the other:
# one Evacuation-priority VMMigration per domain, within the slot limits.
DRAIN_HOST=$(kq get xendomains -A -o jsonpath='{range .items[*]}{.status.host}{"\n"}{end}' | sort | uniq -c | sort -rn | awk 'NR==1 {print $2}')
say "6/6 kubectl xenferry drain ${DRAIN_HOST:-?} --watch (maintenance: every domain leaves the host)"
wait "$PLUGIN_PID" || { info "building the kubectl plugin failed:"; tail -n 20 "$DEMO/plugin-build.log"; exit 1; }
# kubectl takes no flags of its own before a plugin's name.
kx() { "$KUBECTL" xenferry "$@" --request-timeout=20s 2>&1 || true; }
drained=0
if [ -n "$DRAIN_HOST" ]; then
	kx hosts | sed 's/^/            /'
	if timeout "$TIMEOUT" "$KUBECTL" xenferry drain "$DRAIN_HOST" --watch; then
		left=$(kq get xendomains -A -o jsonpath='{range .items[*]}{.status.host}{"\n"}{end}' | grep -cx "$DRAIN_HOST" || true)
		[ "$left" -eq 0 ] && drained=1
		info "$DRAIN_HOST evacuated at $(elapsed)s: $left domains left on it"
	else
		info "the drain of $DRAIN_HOST did not finish; kubectl describe xenhost $DRAIN_HOST:"
		k describe xenhost "$DRAIN_HOST" | tail -n 30
	fi
	kx status -l migration.xenferry.io/reason=drain | sed 's/^/            /'
	kx hosts | sed 's/^/            /'
	kx undrain "$DRAIN_HOST" | sed 's/^/            /'
fi

say "demo wall time $(elapsed)s; $ok of $N sample migrations Succeeded; drain of ${DRAIN_HOST:-no host} $([ "$drained" = 1 ] && echo emptied the host || echo did not empty the host)"
[ "$N" -gt 0 ] && [ "$ok" -eq "$N" ] && [ "$drained" = 1 ]
