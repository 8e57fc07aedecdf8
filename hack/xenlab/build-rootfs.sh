#!/usr/bin/env bash
# Builds the dom0 root filesystem image (Debian 12 + Xen 4.17) with
# debootstrap, cached in $WORK: rootfs/ (the tree), boot/ (Xen, kernel,
# initrd) and dom0.img (ext4 made with mkfs.ext4 -d, no loop mounts).
# Idempotent: each step leaves a stamp and is skipped when it is there.
source "$(dirname "$0")/lib.sh"
ROOTFS="$WORK/rootfs"
PKGS=xen-hypervisor-4.17-amd64,xen-utils-4.17,xen-utils-common,xenstore-utils,linux-image-amd64,initramfs-tools,kmod,udev,iproute2,bridge-utils,busybox,socat,procps,iputils-ping,util-linux,e2fsprogs,zstd,ethtool

if [[ ! -e $WORK/.rootfs-debootstrap.done ]]; then
	log "debootstrap $SUITE into $ROOTFS (takes a few minutes)"
	rm -rf "$ROOTFS"
	MIRROR=$(lab_mirror) || die "no Debian mirror to bootstrap from"
	debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
		die "debootstrap failed; see $WORK/debootstrap.log (is the Debian mirror reachable? re-run to retry)"
	touch "$WORK/.rootfs-debootstrap.done"
fi

# Configuration: always re-applied (cheap), so script edits take effect.
log "configuring rootfs"
install -C -m 0755 "$XENLAB_DIR/dom0/xenlab-init" "$ROOTFS/sbin/xenlab-init"
install -C -m 0755 "$XENLAB_DIR/dom0/xenlab-rsh" "$ROOTFS/sbin/xenlab-rsh"
mkdir -p "$ROOTFS/xenlab" "$ROOTFS/etc/initramfs-tools"
cat >"$ROOTFS/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,noatime 0 1
FSTAB

sed -i 's/^root:[^:]*:/root::/' "$ROOTFS/etc/shadow"
grep -qx 'virtio_blk' "$ROOTFS/etc/initramfs-tools/modules" 2>/dev/null || {
	printf '%s\n' virtio_pci virtio_blk virtio_net ext4 >>"$ROOTFS/etc/initramfs-tools/modules"
	rm -f "$WORK/.rootfs-initrd.done"
}
if [[ ! -e $WORK/.rootfs-initrd.done ]]; then
	log "regenerating dom0 initrd"
	kver=$(basename "$(ls -d "$ROOTFS"/lib/modules/* | head -1)")
	chroot "$ROOTFS" update-initramfs -u -k "$kver" >"$WORK/initramfs.log" 2>&1 || die "update-initramfs failed; see $WORK/initramfs.log"
	touch "$WORK/.rootfs-initrd.done"
fi

mkdir -p "$WORK/boot"
kver=$(basename "$(ls -d "$ROOTFS"/lib/modules/* | head -1)")
cp -u "$ROOTFS/boot/vmlinuz-$kver" "$WORK/boot/vmlinuz"
cp -u "$ROOTFS/boot/initrd.img-$kver" "$WORK/boot/initrd.img"
xengz=$(ls "$ROOTFS"/boot/xen-4.17*-amd64.gz 2>/dev/null | head -1)
[[ -n $xengz ]] || die "no /boot/xen-4.17*.gz in rootfs"
if [[ ! -e $WORK/boot/xen.elf || $xengz -nt $WORK/boot/xen.elf ]]; then
	zcat "$xengz" >"$WORK/boot/xen.elf"
fi

# The image is rebuilt when the tree changed since it was made.
if [[ ! -e $WORK/dom0.img ]] || [[ -n $(find "$ROOTFS/sbin/xenlab-init" "$ROOTFS/sbin/xenlab-rsh" "$ROOTFS/etc/initramfs-tools/modules" -newer "$WORK/dom0.img" 2>/dev/null) ]]; then
	log "making dom0.img (ext4, 2 GiB)"
	rm -f "$WORK/dom0.img.tmp"
	mkfs.ext4 -q -F -L xenlab-dom0 -d "$ROOTFS" "$WORK/dom0.img.tmp" 2G || die "mkfs.ext4 -d failed"
	mv "$WORK/dom0.img.tmp" "$WORK/dom0.img"
	rm -f "$WORK"/host*.qcow2
fi
log "dom0 image ready: $WORK/dom0.img"
