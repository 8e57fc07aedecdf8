#!/usr/bin/env bash
# operator-e2e.sh: the operator on real Xen (make xenlab-operator-e2e).
#
# The local control plane (hack/controlplane.sh) and the controller run on
# this machine; a node agent runs in each lab dom0 (--backend xen) and
# reaches the API server through QEMU's guestfwd (apifwd.sh). VMMigrations
# then move the lab's domUs (PV xlab, PVH xlabh; each with its own shared
# disk) between the two real Xen hosts through the
# agents' xl data path (xl migrate + node-agent xl-send, mTLS between the
# agents with certificates the controller issued):
#
#   drain             XenHost xenlab-a drained while both domUs run there:
#                     the controller's evacuation migrations must move both
#                     to xenlab-b (condition Evacuated); then it is undrained
#   apply, apply-pvh  b->a (PV, then PVH), must end Succeeded with dedup and
#                     live progress
#   cancel            to the other host, cancelled once bytes flow: must end
#                     Cancelled with the domU where it was
#   kill-target-agent to the other host, its agent killed once bytes flow:
#                     the domU ends on exactly one host, intact
#
# On hosts booted with the hypervisor that has memory paging (hosts left
# running by make xenlab-postcopy-e2e, or XENLAB_XEN), the agents publish
# early resume, the default Hybrid strategy stays hybrid, and the PVH
# domU's migrations resume it early (demandPages, faultP99 below).
#
# After each step: the domU runs on one host only, kept its boot id, its
# counter goes on and its memory check found no bad page (the workload of
# e2e.sh). One JSON line per step on stdout:
# {"step","ok","phase","source","target","domainHosts","stateIntact",
#  "seconds","progressSamples","dedupSavedBytes","linkBytes","memoryBytes"};
# progressSamples counts the distinct percents seen in status while it ran.
source "$(dirname "$0")/lib.sh"

# The domU a step works on and the shared disk its status block is on
# (set before each step).
DOMU=xlab
DISK="$WORK/shared.raw"
NS=default
CP="$REPO_DIR/.xenferry/controlplane"
LOGS="$WORK/operator"
STEP_TIMEOUT=${XENLAB_STEP_TIMEOUT:-1500}
started_hosts=0
controller_pid=
fail=0
mkdir -p "$LOGS"

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	for h in "${HOSTS[@]}"; do
		rsh_timeout 60 "$h" <<<'[ -e /run/xenlab-agent.pid ] && kill "$(cat /run/xenlab-agent.pid)" 2>/dev/null; rm -f /run/xenlab-agent.pid; true' >/dev/null 2>&1 || true
	done
	[[ -n $controller_pid ]] && kill "$controller_pid" 2>/dev/null
	if ((started_hosts)); then
		"$XENLAB_DIR/hosts.sh" down || true
	fi
	"$REPO_DIR/hack/controlplane.sh" down >/dev/null 2>&1 || true
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { log "== $*"; }
k() { kubectl --kubeconfig "$CP/kubeconfig" --request-timeout=30s "$@"; }

# status and link_bytes (lib.sh) read the workload's status block and
# the private link's counters, as e2e.sh does.

# domain_hosts prints the lab hosts (xenlab-a, xenlab-b) where the domU
# exists under its own name or xl's migration names, as a JSON array.
domain_hosts() {
	local out=() h
	for h in "${HOSTS[@]}"; do
		if rsh "$h" <<<"xl list | awk '{print \$1}' | grep -Eq '^$DOMU(--incoming|--migratedaway)?\$'" >/dev/null 2>&1; then
			out+=("\"xenlab-$h\"")
		fi
	done
	local IFS=,
	echo "[${out[*]}]"
}

start_agent() { # HOST
	local h=$1
	rsh "$h" <<EOF >&2
set -e
[ -e /run/xenlab-agent.pid ] && kill "\$(cat /run/xenlab-agent.pid)" 2>/dev/null || true
install -m 0755 /xenlab/share/node-agent /usr/local/bin/
mkdir -p /var/lib/xenferry /var/log/xenlab /xenlab/share/durable
# --durable-dir: the 9p share both dom0s mount, where an early resume's
# spool outlives its source (used only on hosts with memory paging).
setsid nice -n -10 node-agent run --backend xen --kubeconfig /xenlab/share/kubeconfig-lab --host xenlab-$h \
	--data-addr $(host_ip "$h"):7080 --namespace $NS --state-dir /var/lib/xenferry --durable-dir /xenlab/share/durable \
	--heartbeat-interval 5s --status-interval 2s </dev/null >>/var/log/xenlab/agent.log 2>&1 &
echo \$! >/run/xenlab-agent.pid
echo "agent on xenlab-$h: pid \$(cat /run/xenlab-agent.pid)"
EOF
}

kill_agent() { # HOST
	rsh "$1" <<<'kill -9 "$(cat /run/xenlab-agent.pid)"; rm -f /run/xenlab-agent.pid; echo "agent killed"' >&2
}

jq_m() { k get vmmigration "$1" -n "$NS" -o json 2>/dev/null | jq -r "$2" 2>/dev/null; }

# run_step NAME MIGRATION ACTION: migrates the domU (no target named: the
# controller picks the other host, the only one),
# does ACTION (none, cancel, kill-target-agent) once bytes flow, waits for a
# final phase and prints the step's JSON line; ok says whether the step
# ended as it must (see the header).
run_step() {
	local name=$1 mig=$2 action=$3 s boot counter checks b0 b1 t0 phase="" samples=0 last="" sent pct acted=0 src target
	s=$(status "$DISK")
	read -r boot counter checks _ <<<"$s"
	src=$(k get xendomain "$DOMU" -n "$NS" -o jsonpath='{.status.host}')
	case $src in xenlab-a) target=xenlab-b ;; *) target=xenlab-a ;; esac
	b0=$(link_bytes "${src#xenlab-}") || b0=0
	step "$name: $DOMU from $src to $target ($action); status $s"
	# Under emulation the link moves ~5 MiB/s and the domU dirties memory
	# the whole time: the default completion timeout (150 s/GiB) is for
	# real hosts.
	k apply -f - >&2 <<EOF
apiVersion: migration.xenferry.io/v1alpha1
kind: VMMigration
metadata: {name: $mig, namespace: $NS}
spec: {domain: $DOMU, completionTimeoutPerGiB: 3h, progressTimeout: 10m}
EOF
	t0=$SECONDS
	while ((SECONDS - t0 < STEP_TIMEOUT)); do
		phase=$(jq_m "$mig" '.status.phase // ""')
		sent=$(jq_m "$mig" '.status.source.progress.bytesSent // 0')
		pct=$(jq_m "$mig" '.status.source.progress.percent // 0')
		if [[ $sent != 0 && $pct != "$last" ]]; then
			samples=$((samples + 1))
			last=$pct
			log "$name: $phase, $pct%, $sent bytes sent"
		fi
		if ((!acted)) && [[ $action != none && $sent != 0 ]]; then
			acted=1
			case $action in
			cancel) k patch vmmigration "$mig" -n "$NS" --type merge -p '{"spec":{"cancel":true}}' >&2 ;;
			kill-target-agent) kill_agent "${target#xenlab-}" ;;
			esac
		fi
		case $phase in Succeeded | Failed | Cancelled) break ;; esac
		sleep 2
	done
	local secs=$((SECONDS - t0))
	b1=$(link_bytes "${src#xenlab-}") || b1=$b0
	log "$name: phase $phase after ${secs}s: $(jq_m "$mig" '.status.failureReason // .status.conditions[0].message // ""')"
	[[ $(jq_m "$mig" '.status.targetHost // ""') == "$target" ]] || log "$name: the controller chose $(jq_m "$mig" '.status.targetHost // ""'), not $target"
	k get vmmigration "$mig" -n "$NS" -o yaml >"$LOGS/$mig.yaml" 2>&1 || true
	if [[ $action == kill-target-agent ]]; then
		start_agent "${target#xenlab-}"
	fi
	local hosts ok=false st=false saved mem
	hosts=$(domain_hosts)
	if state_intact "$DISK" "$boot" "$counter" "$checks" 180; then st=true; fi
	saved=$(jq_m "$mig" '.status.result.dedupSavedBytes // 0')
	mem=$(jq_m "$mig" '.status.result.memoryBytes // 0')
	[[ $mem == 0 ]] && mem=$((DOMU_MEM_MB << 20))
	if [[ $st == true ]]; then
		case $action in
		none) [[ $phase == Succeeded && $hosts == "[\"$target\"]" ]] && ok=true ;;
		cancel) [[ $phase == Cancelled && $hosts == "[\"$src\"]" ]] && ok=true ;;
		*) [[ ($phase == Failed || $phase == Succeeded) && $hosts != *,* && $hosts != "[]" ]] && ok=true ;;
		esac
	fi
	# Early resume (hosts on a hypervisor with memory paging, PVH domU):
	# what the target's pager fetched on demand, from the status.
	local demand p99
	demand=$(jq_m "$mig" '.status.target.postCopy.demandPages // 0')
	p99=$(jq_m "$mig" '.status.target.postCopy.faultP99 // ""')
	printf '{"step":"%s","ok":%s,"phase":"%s","source":"%s","target":"%s","domainHosts":%s,"stateIntact":%s,"seconds":%d,"progressSamples":%d,"dedupSavedBytes":%s,"linkBytes":%d,"memoryBytes":%s,"engineStrategy":"%s","demandPages":%s,"faultP99":"%s"}\n' \
		"$name" "$ok" "$phase" "$src" "$target" "$hosts" "$st" "$secs" "$samples" "$saved" "$((b1 - b0))" "$mem" \
		"$(jq_m "$mig" '.status.parameters.engineStrategy // ""')" "$demand" "$p99"
}

# ---------------------------------------------------------------- build
step "build"
command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
command -v kubectl >/dev/null || die "kubectl is needed"
nice -n 10 "$XENLAB_DIR/deps.sh"
nice -n 10 "$XENLAB_DIR/build-rootfs.sh"
nice -n 10 "$XENLAB_DIR/build-domu.sh"
(cd "$REPO_DIR" && CGO_ENABLED=0 go build -o "$SHARE/node-agent" ./node-agent && go build -o bin/xenferry-controller .)
[[ -x $REPO_DIR/bin/kube-apiserver ]] || (cd "$REPO_DIR" && hack/tools.sh etcd kube-apiserver >&2)

step "control plane and controller on this machine"
"$REPO_DIR/hack/controlplane.sh" up >&2
k apply -f "$REPO_DIR/config/crd/bases" >&2
k wait --for condition=established --timeout 60s crd --all >&2
# An emulated dom0 with one vCPU running xl's save helper can starve its
# agent for tens of seconds: the heartbeat timeout is widened for the lab.
setsid "$REPO_DIR/bin/xenferry-controller" --kubeconfig "$CP/kubeconfig" --ca-namespace "$NS" --heartbeat-timeout 180s \
	--metrics-bind-address 0 --health-probe-bind-address 0 >"$LOGS/controller.log" 2>&1 &
controller_pid=$!
# The dom0s' kubeconfig: the API server through guestfwd (lab only: the
# admin token, the server's self-signed certificate not verified).
sed -e "s#server: https://127.0.0.1:[0-9]*#server: https://$LAB_API_IP:6443#" "$CP/kubeconfig" >"$SHARE/kubeconfig-lab"
chmod 600 "$SHARE/kubeconfig-lab"

step "hosts"
host_status=$("$XENLAB_DIR/hosts.sh" status)
if grep -q stopped <<<"$host_status"; then
	started_hosts=1
	"$XENLAB_DIR/hosts.sh" down
	"$XENLAB_DIR/hosts.sh" up || { "$XENLAB_DIR/hosts.sh" down; "$XENLAB_DIR/hosts.sh" up; }
else
	# Running hosts may predate the guestfwd to the API server.
	log "reusing running hosts"
	"$XENLAB_DIR/hosts.sh" wait
fi
for h in "${HOSTS[@]}"; do
	rsh "$h" <<<"xl destroy xlab 2>/dev/null; xl destroy xlabh 2>/dev/null; true" >&2 || true
	start_agent "$h"
done
for i in $(seq 120); do
	n=$(k get xenhosts -o name 2>/dev/null | wc -l)
	((n >= 2)) && break
	sleep 5
done
k get xenhosts >&2 || true
((n >= 2)) || die "the agents did not register their XenHosts (see /var/log/xenlab/agent.log in the dom0s)"

# start_domu NAME CONFIG DISK: creates the domU on a and waits until its
# workload reports from this boot and its XenDomain is published there
# with its disk indexed ahead of any migration (the agent's work).
start_domu() {
	local s b c h ix t0=$SECONDS before
	DOMU=$1 DISK=$3
	step "domU $DOMU on a ($2)"
	# The status block outlives the domU: wait for one from this boot.
	before=$(status "$DISK" | cut -d' ' -f1)
	rsh a <<<"xl create -q -e /xenlab/share/$2" >&2
	while ((SECONDS - t0 < 600)); do
		s=$(status "$DISK")
		read -r b _ c _ <<<"${s:-x 0 0 0}"
		h=$(k get xendomain "$DOMU" -n "$NS" -o jsonpath='{.status.host}' 2>/dev/null || true)
		ix=$(k get xendomain "$DOMU" -n "$NS" -o jsonpath='{.status.diskIndexes[0].percent}/{.status.diskIndexes[0].ready}' 2>/dev/null || true)
		[[ $h == xenlab-a && $b != "$before" && $ix == 100/true ]] && ((c >= 2)) && break
		sleep 3
	done
	log "domU $DOMU: status ${s:-none}, XenDomain on ${h:-none}, disk index ${ix:-none} after $((SECONDS - t0))s"
	[[ $h == xenlab-a && $b != "$before" && $ix == 100/true ]] || die "domU $DOMU not up on xenlab-a, not published, or its disk not indexed"
}

start_domu xlab domu.cfg "$WORK/shared.raw"
start_domu xlabh domu-pvh.cfg "$WORK/shared-pvh.raw"

# The evacuation migrations are the controller's: their timeouts come from
# a MigrationPolicy, widened for the emulated link as run_step's are.
k apply -f - >&2 <<EOF
apiVersion: migration.xenferry.io/v1alpha1
kind: MigrationPolicy
metadata: {name: xenlab-emulated-link}
spec: {completionTimeoutPerGiB: 3h, progressTimeout: 10m}
EOF

# drain_step: both domUs on xenlab-a; spec.drain on its XenHost; waits for
# Evacuated=True, checks both domUs run on xenlab-b only and intact, then
# undrains. One JSON line like run_step's, over both domUs
# (progressSamples: the evacuation migrations that succeeded).
drain_step() {
	local t0=$SECONDS b0 b1 ev="" st=true ok=false hosts=() all phase boot counter checks mem=0 saved=0 n=0 d m
	local -A S
	for d in xlab:"$WORK/shared.raw" xlabh:"$WORK/shared-pvh.raw"; do S[$d]=$(status "${d#*:}"); done
	b0=$(link_bytes a) || b0=0
	step "drain: XenHost xenlab-a with xlab and xlabh"
	k patch xenhost xenlab-a --type merge -p '{"spec":{"drain":true}}' >&2
	while ((SECONDS - t0 < STEP_TIMEOUT)); do
		ev=$(k get xenhost xenlab-a -o jsonpath='{.status.conditions[?(@.type=="Evacuated")].status}' 2>/dev/null || true)
		log "drain: $(k get xenhost xenlab-a -o jsonpath='{.status.conditions[?(@.type=="Draining")].message}' 2>/dev/null || true)"
		[[ $ev == True ]] && break
		sleep 5
	done
	local secs=$((SECONDS - t0))
	b1=$(link_bytes a) || b1=$b0
	k get vmmigrations -n "$NS" -l migration.xenferry.io/drain-host=xenlab-a -o yaml >"$LOGS/drain.yaml" 2>&1 || true
	k get xenhost xenlab-a -o yaml >>"$LOGS/drain.yaml" 2>&1 || true
	for d in xlab:"$WORK/shared.raw" xlabh:"$WORK/shared-pvh.raw"; do
		DOMU=${d%%:*}
		hosts+=("$(domain_hosts)")
		read -r boot counter checks _ <<<"${S[$d]}"
		state_intact "${d#*:}" "$boot" "$counter" "$checks" 180 || st=false
	done
	for m in $(k get vmmigrations -n "$NS" -l migration.xenferry.io/drain-host=xenlab-a -o jsonpath='{range .items[?(@.status.phase=="Succeeded")]}{.metadata.name}{" "}{end}'); do
		n=$((n + 1))
		mem=$((mem + $(jq_m "$m" '.status.result.memoryBytes // 0')))
		saved=$((saved + $(jq_m "$m" '.status.result.dedupSavedBytes // 0')))
	done
	k patch xenhost xenlab-a --type merge -p '{"spec":{"drain":false}}' >&2
	all=$(printf '%s\n' "${hosts[@]}" | jq -sc 'add | unique')
	phase=$([[ $ev == True ]] && echo Evacuated || echo NotEvacuated)
	log "drain: $phase after ${secs}s, $n evacuation migrations succeeded, domUs on $all"
	[[ $phase == Evacuated && $st == true && $n -ge 2 && ${hosts[0]} == '["xenlab-b"]' && ${hosts[1]} == '["xenlab-b"]' ]] && ok=true
	printf '{"step":"drain","ok":%s,"phase":"%s","source":"xenlab-a","target":"xenlab-b","domainHosts":%s,"stateIntact":%s,"seconds":%d,"progressSamples":%d,"dedupSavedBytes":%s,"linkBytes":%d,"memoryBytes":%s}\n' \
		"$ok" "$phase" "$all" "$st" "$secs" "$n" "$saved" "$((b1 - b0))" "$mem"
}

results=()
results+=("$(drain_step)")
# Each step starts where the previous one left its domU.
DOMU=xlab DISK="$WORK/shared.raw"
results+=("$(run_step apply xlab-apply none)")
DOMU=xlabh DISK="$WORK/shared-pvh.raw"
results+=("$(run_step apply-pvh xlabh-apply none)")
DOMU=xlab DISK="$WORK/shared.raw"
results+=("$(run_step cancel xlab-cancel cancel)")
results+=("$(run_step kill-target-agent xlab-kill kill-target-agent)")

for r in "${results[@]}"; do
	printf '%s\n' "$r"
	jq -e '.ok' <<<"$r" >/dev/null || fail=1
done
if ((fail)); then
	for h in "${HOSTS[@]}"; do
		log "agent log of $h:"
		rsh "$h" <<<"tail -n 40 /var/log/xenlab/agent.log" >&2 || true
	done
	tail -n 40 "$LOGS/controller.log" >&2 || true
fi
exit "$fail"
