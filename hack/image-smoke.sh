#!/usr/bin/env bash
# hack/image-smoke.sh builds the top-level Dockerfile, unchanged, for each of
# its targets with buildah (Debian's package) and runs every binary of each
# image with --help.
#
# No container registry is reachable here, so the base images the Dockerfile
# names are created locally, under the same short names, before the build
# (buildah finds a short name in local storage first, so the build pulls
# nothing):
#   debian:bookworm-slim  debootstrap --variant=minbase of bookworm
#   golang:1.26           that root file system + this machine's Go
# The root file system and the images are cached under .cache/image-smoke
# (ignored by git and by the build context); a second run reuses them.
#
# Storage and isolation: chroot isolation (no user namespaces needed; the
# build's RUN steps share the host's network, which is how they reach the
# module proxy below), and the overlay storage driver when this file system
# takes a kernel overlay mount (probed first), else vfs, which works
# anywhere but copies every layer in full. On overlay the build keeps its
# layers (--layers), so the node-agent target reuses the builder stage the
# controller target built, and a second run with unchanged sources builds
# nothing; on vfs it does not, so that each stage is committed (copied)
# once rather than once per step.
#
# Go modules: the build's `go mod download` reads the GOPROXY build
# argument; here it is a loopback HTTP server over this machine's module
# cache (its cache/download folder is a GOPROXY layout), falling back to
# `go env GOPROXY`, so the build needs no network when the cache is warm.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$ROOT/.cache/image-smoke"
SUITE=bookworm
GO_TAG=1.26
export GOTOOLCHAIN=local
log() { printf '[image-smoke] %s\n' "$*"; }

cd "$ROOT"
# shellcheck source=hack/debian-mirror.sh
. hack/debian-mirror.sh

need_pkgs=()
command -v buildah >/dev/null || need_pkgs+=(buildah)
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
if ((${#need_pkgs[@]})); then
	[ "$(id -u)" = 0 ] || { log "need root to install ${need_pkgs[*]}"; exit 1; }
	log "installing ${need_pkgs[*]} from Debian"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

mkdir -p "$CACHE"
driver=vfs
probe="$CACHE/overlay-probe"
mkdir -p "$probe"/{lower,upper,work,merged}
if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" "$probe/merged" 2>/dev/null; then
	umount "$probe/merged"
	driver=overlay
fi
rm -rf "$probe"
layers=--layers=false
[ "$driver" = overlay ] && layers=--layers
log "storage driver: $driver ($layers), isolation: chroot"
BUILDAH=(buildah --root "$CACHE/storage-$driver" --runroot "$CACHE/run-$driver" --storage-driver "$driver")
export BUILDAH_ISOLATION=chroot

have_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# 1. A minimal Debian root file system (once).
if [ ! -f "$CACHE/rootfs.tar.done" ]; then
	mirror=$(debian_mirror)
	log "debootstrap $SUITE (minbase) from $mirror"
	rm -rf "$CACHE/rootfs"
	debootstrap --variant=minbase --include=ca-certificates,tzdata "$SUITE" "$CACHE/rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
		{ tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
	# Like the official slim image: no apt lists or caches.
	rm -rf "$CACHE/rootfs/var/lib/apt/lists/"* "$CACHE/rootfs/var/cache/apt/"*.bin
	tar -C "$CACHE/rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$CACHE/rootfs.tar" .
	touch "$CACHE/rootfs.tar.done"
fi

# 2. The stand-in base images, under the names the Dockerfile uses.
if ! have_image debian:$SUITE-slim; then
	log "creating debian:$SUITE-slim"
	c=$("${BUILDAH[@]}" from scratch)
	"${BUILDAH[@]}" add "$c" "$CACHE/rootfs.tar" / >/dev/null
	"${BUILDAH[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
	"${BUILDAH[@]}" commit -q --rm "$c" debian:$SUITE-slim >/dev/null
fi
goroot=$(go env GOROOT)
gover=$(go env GOVERSION)
if ! have_image golang:$GO_TAG ||
	[ "$("${BUILDAH[@]}" inspect --type image --format '{{index .ImageAnnotations "org.xenferry.goversion"}}' golang:$GO_TAG)" != "$gover" ]; then
	log "creating golang:$GO_TAG from $goroot ($gover)"
	c=$("${BUILDAH[@]}" from --pull=never debian:$SUITE-slim)
	"${BUILDAH[@]}" copy "$c" "$goroot" /usr/local/go >/dev/null
	"${BUILDAH[@]}" config --env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--env GOLANG_VERSION="${gover#go}" --env GOPATH=/go --env GOTOOLCHAIN=local --workingdir /go \
		--annotation org.xenferry.goversion="$gover" "$c"
	"${BUILDAH[@]}" run "$c" -- mkdir -p /go/bin /go/src
	"${BUILDAH[@]}" commit -q --rm "$c" golang:$GO_TAG >/dev/null
fi

# 3. A loopback module proxy over this machine's module cache.
modcache=$(go env GOMODCACHE)/cache/download
(cd "$ROOT" && go mod download) # fills the cache (from GOPROXY) when it lacks a module
# A fixed port when free: the GOPROXY build argument is part of the layer
# cache key, so a port that changed every run would rebuild every time.
port=${XF_GOPROXY_PORT:-38765}
if ! python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1",int(sys.argv[1]))); s.close()' "$port" 2>/dev/null; then
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
fi
python3 -m http.server --bind 127.0.0.1 --directory "$modcache" "$port" >"$CACHE/goproxy.log" 2>&1 &
proxy_pid=$!
trap 'kill "$proxy_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
	curl -fsS "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
	sleep 0.1
done
goproxy="http://127.0.0.1:$port,$(go env GOPROXY)"

# 4. Build the Dockerfile, unchanged, for each target; run the binaries.
build() { # TARGET TAG
	log "building --target $1 as $2"
	"${BUILDAH[@]}" bud --isolation chroot --network host --pull=never "$layers" \
		--build-arg GOPROXY="$goproxy" --target "$1" -t "$2" -f Dockerfile . 2>&1 |
		grep -vE '^(Copying (blob|config)|Writing manifest|Storing signatures)' || return 1
	[ "${PIPESTATUS[0]}" = 0 ]
}
smoke() { # IMAGE WANT_USER COMMAND...
	local img=$1 want=$2 c user
	shift 2
	user=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$img")
	[ "$user" = "$want" ] || { log "$img runs as '$user', want '$want'"; return 1; }
	c=$("${BUILDAH[@]}" from --pull=never "$img")
	log "$img (user '${user:-root}'): $*"
	if ! "${BUILDAH[@]}" run --isolation chroot "$c" -- "$@" >"$CACHE/run.out" 2>&1; then
		cat "$CACHE/run.out" >&2
		"${BUILDAH[@]}" rm "$c" >/dev/null
		log "FAIL: $* exited non-zero in $img"
		return 1
	fi
	head -n 3 "$CACHE/run.out" | sed 's/^/    /'
	"${BUILDAH[@]}" rm "$c" >/dev/null
}

build controller localhost/xenferry/controller:smoke
build node-agent localhost/xenferry/node-agent:smoke
smoke localhost/xenferry/controller:smoke 65532:65532 /xenferry-controller --help
smoke localhost/xenferry/node-agent:smoke "" /node-agent --help
for sub in run serve migrate inventory resolve xl-send xl-recv xl-index; do
	smoke localhost/xenferry/node-agent:smoke "" /node-agent "$sub" --help
done
smoke localhost/xenferry/node-agent:smoke "" /bin/sh -n /usr/local/bin/xl
smoke localhost/xenferry/node-agent:smoke "" nsenter --version
log "ok: both targets build from the unchanged Dockerfile and their binaries run"
