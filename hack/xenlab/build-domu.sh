#!/usr/bin/env bash
# Builds what the domU and the dom0s need into the 9p share ($WORK/share):
# the domU kernel (dom0's Debian kernel, PV-capable) and an initramfs whose
# /init is the workload, the node-agent binary, and the shared disk image.
source "$(dirname "$0")/lib.sh"
ROOTFS="$WORK/rootfs"
[[ -d $ROOTFS/lib/modules ]] || die "no rootfs; run build-rootfs.sh first"
mkdir -p "$SHARE" "$WORK/initrd-domu"
kver=$(basename "$(ls -d "$ROOTFS"/lib/modules/* | head -1)")
cp -u "$WORK/boot/vmlinuz" "$SHARE/vmlinuz"

log "building workload and node-agent"
(cd "$REPO_DIR" && CGO_ENABLED=0 go build -trimpath -o "$WORK/initrd-domu/init" ./hack/xenlab/workload) || die "go build workload failed"
(cd "$REPO_DIR" && CGO_ENABLED=0 go build -trimpath -o "$SHARE/node-agent.new" ./node-agent) || die "go build node-agent failed"
mv "$SHARE/node-agent.new" "$SHARE/node-agent"
cp "$ROOTFS/lib/modules/$kver/kernel/drivers/block/xen-blkfront.ko" "$WORK/initrd-domu/"
(cd "$WORK/initrd-domu" && find . | cpio -o -H newc --quiet | gzip -1 >"$SHARE/initrd-domu.gz.new") && mv "$SHARE/initrd-domu.gz.new" "$SHARE/initrd-domu.gz"

if [[ ! -e $WORK/shared.raw ]]; then
	log "making shared disk ${SHARED_MB} MiB (random data after the first MiB)"
	truncate -s "${SHARED_MB}M" "$WORK/shared.raw.tmp"
	head -c $(((SHARED_MB - 1) << 20)) /dev/urandom | dd of="$WORK/shared.raw.tmp" bs=1M seek=1 conv=notrunc status=none
	mv "$WORK/shared.raw.tmp" "$WORK/shared.raw"
fi

# The PVH domU has a disk of its own (the status block is per disk).
if [[ ! -e $WORK/shared-pvh.raw ]]; then
	log "making the PVH domU's shared disk ${SHARED_PVH_MB} MiB"
	truncate -s "${SHARED_PVH_MB}M" "$WORK/shared-pvh.raw.tmp"
	head -c $(((SHARED_PVH_MB - 1) << 20)) /dev/urandom | dd of="$WORK/shared-pvh.raw.tmp" bs=1M seek=1 conv=notrunc status=none
	mv "$WORK/shared-pvh.raw.tmp" "$WORK/shared-pvh.raw"
fi

# PVH under TCG: its emulated SVM mis-reports the RDTSCP intercept
# (../shared/notes/xenlab.md), hence the cpuid and TSC settings.
cat >"$SHARE/domu-pvh.cfg" <<CFG
name = "xlabh"
type = "pvh"
kernel = "/xenlab/share/vmlinuz"
ramdisk = "/xenlab/share/initrd-domu.gz"
extra = "console=hvc0 quiet xenlab.cache=32"
memory = $DOMU_MEM_MB
maxmem = $DOMU_MEM_MB
vcpus = 1
cpuid = "host,rdtscp=0"
tsc_mode = "native"
disk = [ "phy:/dev/vdc,xvda,w" ]
on_crash = "preserve"
CFG

cat >"$SHARE/domu.cfg" <<CFG
name = "xlab"
type = "pv"
kernel = "/xenlab/share/vmlinuz"
ramdisk = "/xenlab/share/initrd-domu.gz"
extra = "console=hvc0 quiet"
memory = $DOMU_MEM_MB
maxmem = $DOMU_MEM_MB
vcpus = 1
disk = [ "phy:/dev/vdb,xvda,w" ]
on_crash = "preserve"
CFG
log "domU pieces ready in $SHARE"
