# Common settings for the xenlab scripts; sourced, not run.
set -euo pipefail
XENLAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$XENLAB_DIR/../.." && pwd)"
WORK="${XENLAB_WORK:-$XENLAB_DIR/.work}"
mkdir -p "$WORK"
SUITE=bookworm
# shellcheck source=../debian-mirror.sh
. "$REPO_DIR/hack/debian-mirror.sh"
# The mirror is looked up only by the stages that download (debootstrap).
lab_mirror() { if [[ -n ${XENLAB_MIRROR:-} ]]; then echo "$XENLAB_MIRROR"; else debian_mirror; fi; }
log() { printf '%s xenlab: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Lab layout (override with the environment).
HOSTS=(a b)
HOST_MEM_MB=${XENLAB_HOST_MEM_MB:-1536}
DOM0_MEM=${XENLAB_DOM0_MEM:-512M}
DOMU_MEM_MB=${XENLAB_DOMU_MEM_MB:-128}
SHARED_MB=${XENLAB_SHARED_MB:-256}
SHARED_PVH_MB=${XENLAB_SHARED_PVH_MB:-64}
PORT_BASE=${XENLAB_PORT_BASE:-22220}
SHARE="$WORK/share"
ctl_port() { case $1 in a) echo $((PORT_BASE + 1)) ;; b) echo $((PORT_BASE + 2)) ;; esac; }
link_port() { echo $((PORT_BASE + 10)); }
host_ip() { case $1 in a) echo 198.18.77.1 ;; b) echo 198.18.77.2 ;; esac; }
# The dom0s reach the host's local control plane (hack/controlplane.sh) at
# this address of their control network (QEMU guestfwd, apifwd.sh).
LAB_API_IP=198.19.0.100
host_idx() { case $1 in a) echo 0a ;; b) echo 0b ;; esac; }

# rsh HOST: runs the script on stdin in dom0 of HOST, prints its output and
# returns its exit status.
rsh() {
	local h=$1 out rc
	out=$(socat -t 100000 -T 100000 STDIO "TCP:127.0.0.1:$(ctl_port "$h")" 2>&1) || true
	rc=$(printf '%s\n' "$out" | sed -n 's/^__XENLAB_RC=//p' | tail -1)
	printf '%s\n' "$out" | grep -v '^__XENLAB_RC=' || true
	[[ -n $rc ]] || { log "rsh $h: no exit status (control channel down?)"; return 255; }
	return "$rc"
}

# rsh_timeout SECONDS HOST: rsh with a deadline (timeout(1) runs
# programs, not shell functions).
rsh_timeout() {
	timeout "$1" bash -c "source '$XENLAB_DIR/lib.sh'; rsh $2"
}

# tidy_dom0s DOMU: in every host's dom0, stops the transports' listeners
# a lab run started, destroys DOMU and removes the link shaping (for a
# run that reused hosts it did not boot). Never fails.
tidy_dom0s() {
	local h
	for h in "${HOSTS[@]}"; do
		rsh_timeout 60 "$h" <<EOF >/dev/null 2>&1 || true
for p in /run/xenlab-stock-recv.pid /run/xenlab-xl-recv.pid; do
	[ -e "\$p" ] && kill "\$(cat "\$p")" 2>/dev/null; rm -f "\$p"
done
xl destroy $1 2>/dev/null
tc qdisc del dev "\$(cat /run/xenlab-linknic 2>/dev/null)" root 2>/dev/null
true
EOF
	done
}

# status [DISK] prints the workload's status block on a shared disk (the
# PV domU's by default) as "BOOT COUNTER CHECKS BAD", or nothing when there
# is none.
status() {
	dd if="${1:-$WORK/shared.raw}" bs=4096 count=1 iflag=direct status=none 2>/dev/null | tr -d '\0' |
		sed -n 's/^XENLAB-STATUS boot=\([0-9a-f]*\) counter=\([0-9]*\) checks=\([0-9]*\) bad=\([0-9]*\).*/\1 \2 \3 \4/p' | head -1
}

# link_bytes HOST prints rx+tx bytes of HOST's private-link NIC.
link_bytes() {
	local mac
	mac="52:54:00:77:$(host_idx "$1"):02"
	rsh "$1" <<EOF
for n in /sys/class/net/*; do
	if [ "\$(cat \$n/address)" = "$mac" ] && [ ! -e \$n/bridge ]; then
		echo \$(( \$(cat \$n/statistics/rx_bytes) + \$(cat \$n/statistics/tx_bytes) ))
		exit 0
	fi
done
echo "no NIC with MAC $mac" >&2; exit 1
EOF
}

# state_intact DISK BOOT COUNTER CHECKS SECONDS: within SECONDS the
# workload's status block on DISK shows the same boot, a counter past
# COUNTER, two more memory checks than CHECKS, and no bad page.
state_intact() {
	local disk=$1 boot=$2 counter=$3 checks=$4 limit=$5 t0=$SECONDS s b n c bad
	while ((SECONDS - t0 < limit)); do
		s=$(status "$disk")
		read -r b n c bad <<<"${s:-x 0 0 0}"
		[[ $b == "$boot" ]] || { log "state: boot id changed ($boot -> $b): the domU was restarted"; return 1; }
		((bad == 0)) || { log "state: memory check found $bad bad pages"; return 1; }
		if ((n > counter && c >= checks + 2)); then
			log "state: intact (was counter=$counter checks=$checks, now $s)"
			return 0
		fi
		sleep 2
	done
	log "state: counter/checks did not advance within ${limit}s ($s)"
	return 1
}
