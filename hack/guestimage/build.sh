#!/usr/bin/env bash
# Builds a real Debian bookworm guest, boots it under QEMU (TCG), runs a
# workload in it and saves raw dumps of its RAM plus its disk image, for
# benchmarks (`go run ./hack/migbench -scenario image:MEM,DISK`) and for
# hack/memscan. Not for CI. See hack/guestimage/README.md.
#
# Usage: hack/guestimage/build.sh [deps|rootfs|image|run|all|variants|clean]   (default: all)
#
# "variants" runs the guest once per workload profile (default, read-heavy,
# write-heavy, app-heap, mem512; see VARIANTS below) and keeps each pair under
# .work/variants/NAME/; the default profile runs last, so .work/mem.raw is
# the default one afterwards.
#
# Every stage is cached under hack/guestimage/.work/ and is skipped when its
# inputs have not changed. FORCE=rootfs|image|run redoes that stage and the
# ones after it (FORCE=1 redoes all). Settings (environment):
#   GUEST_MEM_MIB   guest RAM in MiB                    (default 1024)
#   GUEST_DISK_SIZE size of the ext4 disk image         (default 4G)
#   READ_MIB        MiB of files the workload reads     (default 400)
#   WRITE_MIB       MiB of new file data it writes      (default 64)
#   ANON_MIB        MiB of python3 heap it keeps alive  (default 0: none)
#   SETTLE_SEC      idle seconds after boot before the idle dump (default 30)
#   GUEST_TIMEOUT   seconds the whole guest run may take (default 2400)
#   DEBIAN_MIRROR   Debian mirror for debootstrap       (default: this host's apt mirror)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W="$HERE/.work"
GUEST_MEM_MIB=${GUEST_MEM_MIB:-1024}
GUEST_DISK_SIZE=${GUEST_DISK_SIZE:-4G}
READ_MIB=${READ_MIB:-400}
WRITE_MIB=${WRITE_MIB:-64}
ANON_MIB=${ANON_MIB:-0}
SETTLE_SEC=${SETTLE_SEC:-30}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-2400}
FORCE=${FORCE:-0}
SUITE=bookworm
# Packages on top of debootstrap's minbase: a kernel (its initramfs is built
# in the chroot), systemd as init, a compiler for the workload, python3 so the
# page cache holds a typical interpreter too.
PACKAGES=linux-image-amd64,systemd-sysv,udev,kmod,procps,gcc,libc6-dev,make,python3-minimal

log() { printf '[guestimage %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$W"

# shellcheck source=../debian-mirror.sh
. "$(dirname "${BASH_SOURCE[0]}")/../debian-mirror.sh"
mirror() { debian_mirror; }

# stamp NAME VALUE: true when .work/NAME.stamp holds VALUE (stage up to date).
stage_order() { case $1 in rootfs) echo 1 ;; image) echo 2 ;; run) echo 3 ;; 1 | all) echo 0 ;; *) echo 9 ;; esac; }
stamp_ok() {
	[[ $FORCE == 0 || $(stage_order "$FORCE") -gt $(stage_order "$1") ]] &&
		[[ -f "$W/$1.stamp" && "$(cat "$W/$1.stamp")" == "$2" ]]
}
stamp_set() { printf '%s' "$2" >"$W/$1.stamp"; }

stage_deps() {
	local need=()
	command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
	command -v debootstrap >/dev/null || need+=(debootstrap)
	command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
	[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
	command -v go >/dev/null || die "go is not installed; the capture helper is Go"
	if ((${#need[@]})); then
		log "installing Debian packages: ${need[*]}"
		apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
			--no-install-recommends "${need[@]}" >/dev/null
	fi
	log "deps ok: $(qemu-system-x86_64 --version | head -n1)"
}

# Unmount anything debootstrap left mounted under a directory.
umount_under() {
	local d=$1 m
	[[ -d $d ]] || return 0
	for m in $(awk -v d="$(realpath "$d")" '$2 ~ "^"d {print $2}' /proc/mounts | sort -r); do
		umount -l "$m" 2>/dev/null || true
	done
}

stage_rootfs() {
	local key="$SUITE|minbase|$PACKAGES"
	if stamp_ok rootfs "$key" && [[ -d $W/rootfs/boot ]]; then
		log "rootfs cached ($W/rootfs)"
		return
	fi
	local tmp="$W/rootfs.tmp" m
	m=$(mirror)
	umount_under "$tmp"
	rm -rf "$tmp" "$W/rootfs"
	mkdir -p "$W/debs"
	log "debootstrap $SUITE (minbase + ${PACKAGES//,/ }) from $m; takes a few minutes; log: $W/debootstrap.log"
	trap 'umount_under "$W/rootfs.tmp"' EXIT
	local t0=$SECONDS
	# Progress: debootstrap prints one line per step; show the I:/W:/E: lines.
	if ! nice -n 10 debootstrap --variant=minbase --include="$PACKAGES" \
		--cache-dir="$W/debs" "$SUITE" "$tmp" "$m" 2>&1 |
		tee "$W/debootstrap.log" | grep --line-buffered -E '^(I: (Retrieving|Validating|Installing|Configuring|Base system)|W:|E:)' |
		awk '{ n++; if (n % 25 == 1 || $1 != "I:" || /Base system/) { print "[guestimage] debootstrap: " $0; fflush() } }' >&2; then
		:
	fi
	[[ -f $tmp/etc/debian_version && -n "$(ls "$tmp"/boot/vmlinuz-* 2>/dev/null)" ]] ||
		die "debootstrap failed (see $W/debootstrap.log); check that the Debian mirror $m is reachable, then rerun"
	umount_under "$tmp"
	trap - EXIT
	mv "$tmp" "$W/rootfs"
	stamp_set rootfs "$key"
	rm -f "$W/image.stamp"
	log "rootfs built in $((SECONDS - t0)) s, $(du -sh "$W/rootfs" | cut -f1)"
}

# Writes the guest's configuration and workload into the rootfs (idempotent).
configure_rootfs() {
	local r="$W/rootfs"
	echo xfguest >"$r/etc/hostname"
	printf '127.0.0.1 localhost\n127.0.1.1 xfguest\n' >"$r/etc/hosts"
	printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$r/etc/fstab"
	# Timers that would start unrelated disk work in the middle of a run.
	local u
	for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
		systemd-timesyncd.service; do
		ln -sf /dev/null "$r/etc/systemd/system/$u"
	done
	install -D -m 0755 "$HERE/guest/xf-workload" "$r/usr/local/sbin/xf-workload"
	install -D -m 0644 "$HERE/guest/xf-workload.service" "$r/etc/systemd/system/xf-workload.service"
	mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
	ln -sf ../xf-workload.service "$r/etc/systemd/system/multi-user.target.wants/xf-workload.service"
	mkdir -p "$r/usr/local/src/xfwork"
	cp "$HERE"/guest/xfwork/* "$r/usr/local/src/xfwork/"
	cat >"$r/etc/default/xf-workload" <<EOF
READ_MIB=$READ_MIB
WRITE_MIB=$WRITE_MIB
ANON_MIB=$ANON_MIB
SETTLE_SEC=$SETTLE_SEC
EOF
	# Leftovers of earlier runs never reach the image (the image is made from
	# this directory, the runs happen on copies of the image).
	rm -rf "$r/root/xfwork" "$r/root/written"
}

image_key() {
	echo "$(cat "$W/rootfs.stamp" 2>/dev/null)|$GUEST_DISK_SIZE|$READ_MIB|$WRITE_MIB|$ANON_MIB|$SETTLE_SEC|$(cat "$HERE"/guest/xf-workload "$HERE"/guest/xf-workload.service "$HERE"/guest/xfwork/* | sha256sum | cut -c1-16)"
}
run_key() { echo "$(image_key)|$GUEST_MEM_MIB|${GUEST_CPU:-}"; }

stage_image() {
	local key
	key=$(image_key)
	if stamp_ok image "$key" && [[ -f $W/disk-base.raw && -f $W/vmlinuz && -f $W/initrd.img ]]; then
		log "disk image cached ($W/disk-base.raw)"
		return
	fi
	configure_rootfs
	local k i
	k=$(ls "$W"/rootfs/boot/vmlinuz-* | sort -V | tail -n1)
	i=$(ls "$W"/rootfs/boot/initrd.img-* | sort -V | tail -n1)
	[[ -f $k && -f $i ]] || die "no kernel or initramfs in $W/rootfs/boot; FORCE=1 $0 rootfs to rebuild the rootfs"
	cp "$k" "$W/vmlinuz"
	cp "$i" "$W/initrd.img"
	log "mkfs.ext4 -d rootfs -> disk-base.raw ($GUEST_DISK_SIZE)"
	local t0=$SECONDS
	rm -f "$W/disk-base.raw.tmp"
	nice -n 10 mkfs.ext4 -q -F -L xfroot -b 4096 -d "$W/rootfs" "$W/disk-base.raw.tmp" "$GUEST_DISK_SIZE" ||
		die "mkfs.ext4 failed; is there space under $W?"
	mv "$W/disk-base.raw.tmp" "$W/disk-base.raw"
	stamp_set image "$key"
	rm -f "$W/run.stamp"
	log "image built in $((SECONDS - t0)) s: $(du -h --apparent-size "$W/disk-base.raw" | cut -f1) apparent, $(du -h "$W/disk-base.raw" | cut -f1) used; kernel $(basename "$k")"
}

stage_run() {
	local key
	key=$(run_key)
	if stamp_ok run "$key" && [[ -f $W/mem.raw && -f $W/disk.raw ]]; then
		log "guest run cached: $W/mem.raw $W/disk.raw (FORCE=run to redo the run)"
		return
	fi
	log "building the capture helper"
	(cd "$ROOT" && GOTOOLCHAIN=local go build -o "$W/bin/capture" ./hack/guestimage/capture) ||
		die "go build ./hack/guestimage/capture failed"
	rm -f "$W/mem.raw" "$W/mem-idle.raw" "$W/disk-idle.raw"
	# The run writes to disk.raw itself; run.stamp (written last) marks a
	# complete run, so an interrupted one is redone from disk-base.raw.
	rm -f "$W/run.stamp"
	log "copying disk-base.raw -> disk.raw (sparse)"
	cp --sparse=always "$W/disk-base.raw" "$W/disk.raw"
	local args=(
		-work "$W" -kernel "$W/vmlinuz" -initrd "$W/initrd.img" -disk "$W/disk.raw"
		-mem-mib "$GUEST_MEM_MIB" -timeout "${GUEST_TIMEOUT}s"
		-idle-mem "$W/mem-idle.raw" -idle-disk "$W/disk-idle.raw" -mem-out "$W/mem.raw"
	)
	[[ -n ${GUEST_CPU:-} ]] && args+=(-cpu "$GUEST_CPU")
	"$W/bin/capture" "${args[@]}" || die "guest run failed (serial console: $W/serial.log, control log: $W/control.log)"
	stamp_set run "$key"
	log "done: $W/mem.raw ($(du -h --apparent-size "$W/mem.raw" | cut -f1)), $W/disk.raw; idle pair: $W/mem-idle.raw $W/disk-idle.raw"
}

# name:settings of the workload profiles measured by "variants".
VARIANTS=(
	"read-heavy:READ_MIB=700 WRITE_MIB=128"
	"write-heavy:READ_MIB=100 WRITE_MIB=512"
	"app-heap:ANON_MIB=256"
	"mem512:GUEST_MEM_MIB=512"
	"default:"
)

stage_variants() {
	local v name settings d kv
	for v in "${VARIANTS[@]}"; do
		name=${v%%:*}
		settings=${v#*:}
		read -r -a kv <<<"$settings"
		d="$W/variants/$name"
		log "variant $name (${settings:-default settings})"
		# Each variant sets only its own settings; the rest are the defaults.
		if [[ $FORCE == 0 && -f $d/run.stamp && "$(cat "$d/run.stamp")" == "$(env -u READ_MIB -u WRITE_MIB -u ANON_MIB -u GUEST_MEM_MIB "${kv[@]}" "$HERE/build.sh" key)" ]]; then
			log "variant $name cached ($d)"
			continue
		fi
		env -u READ_MIB -u WRITE_MIB -u ANON_MIB -u GUEST_MEM_MIB "${kv[@]}" "$HERE/build.sh" all
		rm -rf "$d"
		mkdir -p "$d"
		cp --sparse=always "$W/mem.raw" "$W/disk.raw" "$W/capture.json" "$d/"
		if [[ $name == default ]]; then
			cp --sparse=always "$W/mem-idle.raw" "$W/disk-idle.raw" "$d/"
		fi
		cp "$W/run.stamp" "$d/run.stamp"
		log "variant $name saved in $d"
	done
}

cmd=${1:-all}
case $cmd in
deps) stage_deps ;;
rootfs) stage_deps; stage_rootfs ;;
image) stage_deps; stage_rootfs; stage_image ;;
run | all) stage_deps; stage_rootfs; stage_image; stage_run ;;
variants) stage_deps; stage_rootfs; stage_variants ;;
key) run_key ;; # internal: the cache key of a run with the current settings
clean)
	umount_under "$W"
	rm -rf "$W"
	log "removed $W"
	;;
*) die "unknown stage $cmd (want deps|rootfs|image|run|all|variants|clean)" ;;
esac
