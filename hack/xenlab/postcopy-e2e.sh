#!/usr/bin/env bash
# postcopy-e2e.sh: early resume on real Xen (make xenlab-postcopy-e2e).
#
#  1. builds what is missing, and the hypervisor with memory paging
#     (build-xen.sh); boots hosts a and b on it, or reuses hosts that run it;
#  2. installs node-agent and the stock transport in each dom0; shapes the
#     private link to XENLAB_LINK_MBIT (default 16; 0 leaves it alone), see
#     below;
#  3. runs the pager's Xen-gated test (paging.test) on a fresh PVH domU;
#  4. migrates the PVH domU "xlabh" a->b three times, each from a fresh
#     boot: stock `xl migrate`, xenferry's pre-copy transport
#     (`node-agent xl-send`, dedup) and xenferry's early resume
#     (`node-agent xl-send --early-resume`), and checks each time that the
#     domU runs on b only, with its boot id, counter and memory intact.
#
# One JSON line per method on stdout:
#   {"method","guest":"pvh","ok","totalSeconds","resumeSeconds","downtimeMs",
#    "linkBytes","demandPages","faultP50Us","faultP99Us","stateIntact"}
# totalSeconds: from the start until every page is at b (early resume: the
# last pushed page; dom0 a's clock). resumeSeconds: from the start until
# the domU runs on b (xl's "Target reports successful startup"; for the
# pre-copy methods the end of the migration). downtimeMs: the longest time
# the workload's 10 ms heartbeat on the shared disk stood still, read from
# the host by hack/xenlab/heartbeat (outside the guest and both dom0s).
#
# Why the link is shaped: under TCG a dom0 reads guest memory at ~10 MiB/s,
# about a thousandth of a real host, while the emulated link runs at
# 5-20 MiB/s, so the lab would be bound by memory reads where a real
# migration is bound by the link. 16 Mbit/s (2 MiB/s) restores the real
# order (memory read ~5x the link, as 10 GB/s against 10 GbE). Every method
# runs over the same shaped link.
source "$(dirname "$0")/lib.sh"

DOMU=xlabh
DISK="$WORK/shared-pvh.raw"
PEER_IP=$(host_ip b)
LINK_MBIT=${XENLAB_LINK_MBIT:-16}
MIGRATE_TIMEOUT=${XENLAB_MIGRATE_TIMEOUT:-1500}
SPOOL=/xenlab/share/spool
started_hosts=0
results=()
fail=0
hbpid=

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	[[ -n $hbpid ]] && kill "$hbpid" 2>/dev/null
	if ((started_hosts)); then
		log "stopping the hosts this run booted"
		"$XENLAB_DIR/hosts.sh" down || true
	else
		tidy_dom0s "$DOMU"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { log "== $*"; }

# fresh_domu: (re)creates the PVH domU on a and waits for its workload.
fresh_domu() {
	local before t0=$SECONDS s b c
	before=$(status "$DISK" | cut -d' ' -f1)
	for o in "${HOSTS[@]}"; do rsh "$o" <<<"xl destroy $DOMU 2>/dev/null; true" >&2; done
	rsh a <<<"xl create -q -e /xenlab/share/domu-pvh.cfg" >&2
	while ((SECONDS - t0 < ${XENLAB_DOMU_TIMEOUT:-300})); do
		s=$(status "$DISK")
		read -r b _ c _ <<<"${s:-x 0 0 0}"
		if [[ $b != "$before" ]] && ((c >= 2)); then
			log "domU $DOMU up on a after $((SECONDS - t0))s: $s"
			echo "$s"
			return 0
		fi
		sleep 2
	done
	log "domU $DOMU did not report within ${XENLAB_DOMU_TIMEOUT:-300}s"
	return 1
}

check_state() {
	local boot=$1 counter=$2 checks=$3
	rsh b <<<"xl domid $DOMU >/dev/null" >/dev/null 2>&1 || { log "state: $DOMU is not on b"; return 1; }
	if rsh a <<<"xl domid $DOMU >/dev/null 2>&1" >/dev/null 2>&1; then log "state: $DOMU is still on a"; return 1; fi
	state_intact "$DISK" "$boot" "$counter" "$checks" 180
}

# migrate METHOD: one a->b migration; appends its JSON line.
migrate() {
	local method=$1 cmd s boot counter checks b0 b1 out rc ok=false intact=false
	local total resume down demand=0 p50=0 p99=0 lz rep
	case $method in
	xl) cmd="xl-stock-send" ;;
	xenferry) cmd="node-agent xl-send --insecure-allow-anonymous --state-dir /var/lib/xenferry --compress --report /run/xenlab-xl-send.json" ;;
	xenferry-postcopy)
		cmd="node-agent xl-send --insecure-allow-anonymous --state-dir /var/lib/xenferry --compress --early-resume --spool-dir $SPOOL --report /run/xenlab-xl-send.json"
		# The push just below the shaped link's rate (see the top).
		((LINK_MBIT > 0)) && cmd+=" --push-rate $((LINK_MBIT * 1000000 / 8 * 85 / 100))"
		;;
	esac
	s=$(fresh_domu) || return 1
	s=$(tail -n1 <<<"$s")
	read -r boot counter checks _ <<<"$s"
	rsh b <<<"rm -f /run/xenlab-lazy.json" >/dev/null
	b0=$(link_bytes a) || return 1
	"$WORK/heartbeat" -disk "$DISK" >"$WORK/heartbeat.json" 2>"$WORK/heartbeat.err" &
	hbpid=$!
	sleep 1
	step "$method: xl migrate -s \"$cmd\" $DOMU $PEER_IP (before: $s)"
	rc=0
	# Times on dom0 a's clock: START, xl's lines, END once xl-send (or xl)
	# is done. xl-send outlives xl with early resume (it pushes the rest).
	out=$(rsh_timeout "$MIGRATE_TIMEOUT" a <<EOF
set -o pipefail
rm -f /run/xenlab-xl-send.json
echo "START \$(date +%s.%N)"
xl migrate -e -s "$cmd" $DOMU $PEER_IP 2>&1 | while IFS= read -r l; do echo "\$(date +%s.%N) \$l"; done
rc=\$?
if [ "$method" != xl ]; then
	for i in \$(seq 1 6000); do [ -e /run/xenlab-xl-send.json ] && break; sleep 0.2; done
fi
echo "END \$(date +%s.%N)"
cat /run/xenlab-xl-send.json 2>/dev/null | sed 's/^/REPORT /'
exit \$rc
EOF
) || rc=$?
	printf '%s\n' "$out" | grep -v '"Sending"' | tail -n 25 >&2
	b1=$(link_bytes a) || b1=$b0
	if ((rc == 0)); then ok=true; else log "$method: xl migrate exited $rc"; fi
	if check_state "$boot" "$counter" "$checks"; then intact=true; fi
	kill "$hbpid" 2>/dev/null; wait "$hbpid" 2>/dev/null; hbpid=
	down=$(jq -r '.maxGapMs // empty' "$WORK/heartbeat.json" 2>/dev/null)
	local t0 t1 tr
	t0=$(sed -n 's/^START //p' <<<"$out" | head -1)
	t1=$(sed -n 's/^END //p' <<<"$out" | head -1)
	tr=$(grep 'Target reports successful startup' <<<"$out" | head -1 | cut -d' ' -f1)
	total=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
	resume=$total
	if [[ $method == xenferry-postcopy && -n $tr ]]; then
		resume=$(awk -v a="$t0" -v b="$tr" 'BEGIN{printf "%.1f", b-a}')
		lz=$(rsh b <<<"cat /run/xenlab-lazy.json 2>/dev/null")
		log "destination's early resume: $lz"
		demand=$(jq -r '.demandPages // 0' <<<"$lz" 2>/dev/null || echo 0)
		p50=$(jq -r '.faultP50Us // 0' <<<"$lz" 2>/dev/null || echo 0)
		p99=$(jq -r '.faultP99Us // 0' <<<"$lz" 2>/dev/null || echo 0)
	fi
	rep=$(sed -n 's/^REPORT //p' <<<"$out")
	[[ -n $rep ]] && log "xl-send report: $rep"
	log "$method: ok=$ok total ${total}s, resume ${resume}s, downtime ${down:-?}ms, $((b1 - b0)) link bytes, demand $demand, state intact=$intact"
	results+=("{\"method\":\"$method\",\"guest\":\"pvh\",\"ok\":$ok,\"totalSeconds\":$total,\"resumeSeconds\":$resume,\"downtimeMs\":${down:-null},\"linkBytes\":$((b1 - b0)),\"demandPages\":${demand:-0},\"faultP50Us\":${p50:-0},\"faultP99Us\":${p99:-0},\"stateIntact\":$intact}")
	[[ $ok == true && $intact == true ]]
}

# ---------------------------------------------------------------- build
step "build (cached in $WORK)"
t0=$SECONDS
command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
nice -n 10 "$XENLAB_DIR/deps.sh"
nice -n 10 "$XENLAB_DIR/build-rootfs.sh"
nice -n 10 "$XENLAB_DIR/build-domu.sh"
XEN_PAGING=$(nice -n 10 "$XENLAB_DIR/build-xen.sh") || die "hypervisor with memory paging not built"
install -m 0755 "$XENLAB_DIR/dom0/xl-stock-send" "$XENLAB_DIR/dom0/xl-stock-recv" "$SHARE/"
(cd "$REPO_DIR" && CGO_ENABLED=0 go test -c -o "$SHARE/paging.test" ./pkg/xenmem/xen/paging) || die "building the pager's test failed"
(cd "$REPO_DIR" && go build -o "$WORK/heartbeat" ./hack/xenlab/heartbeat) || die "building the heartbeat reader failed"
mkdir -p "$SHARE/spool"
log "build: $((SECONDS - t0))s"

# ---------------------------------------------------------------- hosts
step "hosts on the hypervisor with memory paging ($XEN_PAGING)"
t0=$SECONDS
host_status=$("$XENLAB_DIR/hosts.sh" status)
restart=0
grep -q stopped <<<"$host_status" && restart=1
for h in "${HOSTS[@]}"; do
	[[ $(cat "$WORK/host-$h.xen" 2>/dev/null) == "$XEN_PAGING" ]] || restart=1
done
if ((restart)); then
	started_hosts=1
	"$XENLAB_DIR/hosts.sh" down
	XENLAB_XEN=$XEN_PAGING "$XENLAB_DIR/hosts.sh" up || {
		log "hosts did not come up (exit $?); retrying once"
		"$XENLAB_DIR/hosts.sh" down
		XENLAB_XEN=$XEN_PAGING "$XENLAB_DIR/hosts.sh" up
	}
else
	log "reusing running hosts"
	"$XENLAB_DIR/hosts.sh" wait
fi
log "hosts ready: $((SECONDS - t0))s"

step "installing node-agent and transports; link shaped to ${LINK_MBIT} Mbit/s"
for h in "${HOSTS[@]}"; do
	rsh "$h" <<EOF >&2
set -e
install -m 0755 /xenlab/share/node-agent /xenlab/share/xl-stock-send /xenlab/share/xl-stock-recv /usr/local/bin/
mkdir -p /var/lib/xenferry /var/log/xenlab $SPOOL
for p in /run/xenlab-stock-recv.pid /run/xenlab-xl-recv.pid; do
	[ -e "\$p" ] && kill "\$(cat "\$p")" 2>/dev/null || true
	rm -f "\$p"
done
xl destroy $DOMU 2>/dev/null || true
setsid xl-stock-recv $(host_ip "$h") </dev/null >/var/log/xenlab/stock-recv.log 2>&1 &
echo \$! >/run/xenlab-stock-recv.pid
setsid node-agent xl-recv --insecure-allow-anonymous --listen $(host_ip "$h"):7070 --spool-dir $SPOOL --lazy-report /run/xenlab-lazy.json </dev/null >/var/log/xenlab/xl-recv.log 2>&1 &
echo \$! >/run/xenlab-xl-recv.pid
nic=
for n in /sys/class/net/*; do
	if [ "\$(cat \$n/address)" = "52:54:00:77:$(host_idx "$h"):02" ] && [ ! -e \$n/bridge ]; then nic=\$(basename \$n); fi
done
echo "\$nic" >/run/xenlab-linknic
tc qdisc del dev "\$nic" root 2>/dev/null || true
if [ "$LINK_MBIT" != 0 ]; then
	tc qdisc add dev "\$nic" root tbf rate ${LINK_MBIT}mbit burst 32kb latency 100ms
fi
echo "\$(hostname): agent and listeners started, link \$nic: \$(tc qdisc show dev \$nic | head -1)"
EOF
done
rsh b <<<"rm -f $SPOOL/*" >/dev/null

step "the pager's own test on a running PVH domU"
fresh_domu >/dev/null || die "PVH domU did not start on a"
rsh a <<EOF >&2 || die "the pager's Xen-gated test failed"
cd /tmp && XENFERRY_PAGING_DOMAIN=\$(xl domid $DOMU) timeout 300 /xenlab/share/paging.test -test.v -test.run TestPagerPagesARunningDomainOutAndIn 2>&1 | tail -n 8
EOF

# ---------------------------------------------------------------- runs
for m in xl xenferry xenferry-postcopy; do
	step "method $m"
	migrate "$m" || fail=1
done

if ((fail)); then
	for h in "${HOSTS[@]}"; do
		log "logs of $h:"
		rsh "$h" <<<"tail -n 30 /var/log/xenlab/*.log 2>/dev/null" >&2 || true
	done
fi
for r in "${results[@]}"; do printf '%s\n' "$r"; done
exit "$fail"
