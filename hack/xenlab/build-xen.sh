#!/usr/bin/env bash
# Builds the lab's hypervisor with memory paging (CONFIG_MEM_PAGING, which
# Xen marks UNSUPPORTED and Debian leaves out) from Debian's source package
# of the same version as dom0's xen-hypervisor, so Debian's dom0 tools run
# unchanged on it. Idempotent: the ELF is cached under
# .work/xen-paging/VERSION/xen.elf and printed on stdout.
source "$(dirname "$0")/lib.sh"
status_file="$WORK/rootfs/var/lib/dpkg/status"
[[ -r $status_file ]] || die "no dom0 rootfs yet (hack/xenlab/build-rootfs.sh builds it)"
ver=$(awk '/^Package: xen-hypervisor-4\.[0-9]+-amd64$/{p=1} p&&/^Version:/{print $2; exit}' "$status_file")
[[ -n $ver ]] || die "dom0 rootfs has no xen-hypervisor package"
out="$WORK/xen-paging/$ver"
if [[ -s $out/xen.elf ]]; then
	echo "$out/xen.elf"
	exit 0
fi
mkdir -p "$out"
src="$WORK/xen-paging/src-$ver"
if [[ ! -d $src/xen ]]; then
	mirror=$(lab_mirror)
	# The source package is fetched with apt's own machinery (signature and
	# checksums checked) from a private deb-src list, so the machine's apt
	# configuration is read but never changed.
	aptdir="$WORK/xen-paging/apt"
	mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
	printf 'deb-src %s %s main\n' "$mirror" "$SUITE" >"$aptdir/sources.list"
	opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache::Archives=$aptdir/archives" -o APT::Get::AllowUnauthenticated=false)
	log "fetching Debian's xen $ver source from $mirror"
	apt-get "${opts[@]}" update -q >&2 || die "apt-get update of the deb-src list failed"
	rm -rf "$WORK/xen-paging/dl" && mkdir -p "$WORK/xen-paging/dl"
	(cd "$WORK/xen-paging/dl" && apt-get "${opts[@]}" source -q --download-only "xen=$ver" >&2) ||
		die "xen $ver source not on $mirror (a security update's source may be elsewhere; set XENLAB_XEN to a prebuilt ELF)"
	dsc=$(ls "$WORK"/xen-paging/dl/xen_*.dsc | head -1)
	command -v dpkg-source >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dpkg-dev >&2
	rm -rf "$src.tmp" && dpkg-source --no-check -x "$dsc" "$src.tmp" >&2 && mv "$src.tmp" "$src"
fi
need=()
for t in flex:flex bison:bison dpkg-source:dpkg-dev; do command -v "${t%%:*}" >/dev/null || need+=("${t#*:}"); done
if ((${#need[@]})); then
	log "installing the hypervisor's build tools: ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >&2 ||
		die "could not install ${need[*]}"
fi
log "building the hypervisor with CONFIG_MEM_PAGING (about 3 min on 2 cores)"
cd "$src/xen"
make -s defconfig >&2
cat >>.config <<'EOF'
CONFIG_UNSUPPORTED=y
CONFIG_MEM_PAGING=y
EOF
make -s olddefconfig >&2
grep -q '^CONFIG_MEM_PAGING=y' .config || die "CONFIG_MEM_PAGING did not stick in $src/xen/.config"
make -s -j"$(nproc)" >&2 || die "hypervisor build failed in $src/xen"
cp xen "$out/xen.elf.tmp" && mv "$out/xen.elf.tmp" "$out/xen.elf"
log "built $out/xen.elf"
echo "$out/xen.elf"
