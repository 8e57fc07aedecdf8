#!/usr/bin/env bash
# Installs the host packages the lab needs (idempotent: skips what is there).
source "$(dirname "$0")/lib.sh"
pkgs=(qemu-system-x86 qemu-utils debootstrap e2fsprogs socat busybox-static cpio zstd iproute2 xz-utils)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
	log "host packages present"
	exit 0
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
stamp=/var/lib/apt/periodic/xenlab-update-stamp
if [[ ! -e $stamp ]] || [[ -n $(find "$stamp" -mmin +1440) ]]; then
	apt-get -o DPkg::Lock::Timeout=600 update -q
	mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
