#!/usr/bin/env bash
# hosts.sh up|down|status|rsh HOST|wait: the two nested Xen hosts (a, b).
# Each is a QEMU (TCG) running Xen 4.17 with a Debian dom0 on a qcow2 overlay
# of dom0.img, a control NIC (user-net restricted to a loopback port
# forward), a private link NIC (QEMU socket netdev between the two QEMUs),
# the shared raw disks as /dev/vdb (PV domU) and /dev/vdc (PVH domU) and
# the 9p share at /xenlab/share.
source "$(dirname "$0")/lib.sh"
QEMU=${XENLAB_QEMU:-qemu-system-x86_64}
CPU=${XENLAB_CPU:-max,-smap,-xsave}
ACCEL=${XENLAB_ACCEL:-tcg,thread=multi}
# XENLAB_XEN boots another hypervisor (a multiboot ELF, e.g. one rebuilt with
# CONFIG_MEM_PAGING; see docs/xen-postcopy.md) instead of Debian's.
XEN_ELF=${XENLAB_XEN:-$WORK/boot/xen.elf}

start_host() {
	local h=$1 idx pidf
	idx=$(host_idx "$h")
	pidf="$WORK/host-$h.pid"
	if [[ -e $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
		log "host $h already running (pid $(cat "$pidf"))"
		return
	fi
	rm -f "$WORK/host-$h.qcow2"
	qemu-img create -q -f qcow2 -F raw -b "$WORK/dom0.img" "$WORK/host-$h.qcow2"
	local linknet
	if [[ $h == a ]]; then
		linknet="socket,id=link,listen=127.0.0.1:$(link_port)"
	else
		linknet="socket,id=link,connect=127.0.0.1:$(link_port)"
	fi
	: >"$WORK/host-$h.serial"
	nice -n 10 "$QEMU" -name "xenlab-$h" -machine pc -accel "$ACCEL" -cpu "$CPU" -smp 1 -m "$HOST_MEM_MB" \
		-display none -monitor none -serial "file:$WORK/host-$h.serial" \
		-kernel "$XEN_ELF" \
		-append "console=com1 com1=115200,8n1 dom0_mem=$DOM0_MEM,max:$DOM0_MEM dom0_max_vcpus=1 noreboot" \
		-initrd "$WORK/boot/vmlinuz root=/dev/vda rw console=hvc0 init=/sbin/xenlab-init xenlab.host=$h xenlab.ip=$(host_ip "$h") xenlab.ctlmac=52:54:00:77:$idx:01 xenlab.linkmac=52:54:00:77:$idx:02,$WORK/boot/initrd.img" \
		-drive "file=$WORK/host-$h.qcow2,if=virtio,format=qcow2,cache=unsafe" \
		-drive "file=$WORK/shared.raw,if=virtio,format=raw,cache=none,file.locking=off" \
		-drive "file=$WORK/shared-pvh.raw,if=virtio,format=raw,cache=none,file.locking=off" \
		-netdev "user,id=ctl,restrict=on,net=198.19.0.0/24,hostfwd=tcp:127.0.0.1:$(ctl_port "$h")-198.19.0.15:2222,guestfwd=tcp:$LAB_API_IP:6443-cmd:$XENLAB_DIR/apifwd.sh" \
		-device "virtio-net-pci,netdev=ctl,mac=52:54:00:77:$idx:01" \
		-netdev "$linknet" -device "virtio-net-pci,netdev=link,mac=52:54:00:77:$idx:02,host_mtu=9000" \
		-virtfs "local,path=$SHARE,mount_tag=xenlab,security_model=none,id=share" \
		-daemonize -pidfile "$pidf" || die "qemu for host $h failed to start"
	# Which hypervisor this host runs (make xenlab-postcopy-e2e needs the
	# one with memory paging and restarts hosts that run another).
	echo "$XEN_ELF" >"$WORK/host-$h.xen"
	log "host $h started (pid $(cat "$pidf"), serial $WORK/host-$h.serial)"
}

wait_host() {
	local h=$1 deadline=$((SECONDS + ${XENLAB_BOOT_TIMEOUT:-600}))
	while ((SECONDS < deadline)); do
		if grep -q "XENLAB-READY" "$WORK/host-$h.serial" 2>/dev/null; then
			if echo 'test -e /run/xenlab-ready' | rsh "$h" >/dev/null 2>&1; then
				log "host $h ready after ${SECONDS}s"
				return 0
			fi
		fi
		if grep -qE 'segfault|general protection|Kernel panic|Panic on CPU' "$WORK/host-$h.serial" 2>/dev/null; then
			log "host $h: crash in serial log:"
			grep -E 'segfault|general protection|Kernel panic|Panic on CPU' "$WORK/host-$h.serial" | head -5 >&2
			return 2
		fi
		sleep 2
	done
	log "host $h not ready after ${XENLAB_BOOT_TIMEOUT:-600}s; last serial lines:"
	tail -20 "$WORK/host-$h.serial" >&2
	return 1
}

stop_host() {
	local h=$1 pidf="$WORK/host-$h.pid" pid
	[[ -e $pidf ]] || return 0
	pid=$(cat "$pidf")
	if kill -0 "$pid" 2>/dev/null && grep -q qemu "/proc/$pid/cmdline" 2>/dev/null; then
		kill "$pid"
		for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
		kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
		log "host $h stopped"
	fi
	rm -f "$pidf"
}

case ${1:-} in
up)
	for h in "${HOSTS[@]}"; do start_host "$h"; done
	for h in "${HOSTS[@]}"; do wait_host "$h" || exit $?; done
	;;
wait) for h in "${HOSTS[@]}"; do wait_host "$h" || exit $?; done ;;
down) for h in "${HOSTS[@]}"; do stop_host "$h"; done ;;
status)
	for h in "${HOSTS[@]}"; do
		pidf="$WORK/host-$h.pid"
		if [[ -e $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then echo "$h running pid $(cat "$pidf")"; else echo "$h stopped"; fi
	done
	;;
rsh) rsh "$2" ;;
*) echo "usage: $0 up|down|status|wait|rsh HOST" >&2; exit 2 ;;
esac
