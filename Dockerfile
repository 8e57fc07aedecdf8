# xenferry images: the controller (target "controller", the default) and the
# node agent for dom0 (target "node-agent"), both built from one builder.
#
#   docker build -t xenferry/controller:TAG .
#   docker build --target node-agent -t xenferry/node-agent:TAG .
#
# `make image-smoke` builds this file unchanged with buildah and runs the
# binaries of both images.

# Builder: static binaries (CGO_ENABLED=0), so the runtime images need no
# libc. Modules are downloaded in their own layer, before the sources are
# copied, so an edit to the code reuses them. GOPROXY comes from the build
# argument (a mirror, or a local proxy for builds without internet); left
# empty, Go's own default applies.
FROM golang:1.26 AS builder
ARG TARGETOS
ARG TARGETARCH
ARG GOPROXY
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPROXY=${GOPROXY}
# The controller image's whole file system besides its binary: the CA
# bundle, passwd/group with the unprivileged user 65532, and a sticky /tmp
# (controller-runtime writes the metrics server's self-signed certificate
# there). Zone data is compiled into the binary (-tags timetzdata).
RUN mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp /rootfs/home/nonroot && \
    chmod 1777 /rootfs/tmp && chown 65532:65532 /rootfs/home/nonroot && \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ && \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >/rootfs/etc/passwd && \
    printf 'root:x:0:\nnonroot:x:65532:\n' >/rootfs/etc/group
WORKDIR /workspace
COPY go.mod go.sum ./
RUN go mod download
COPY main.go ./
COPY api/ api/
COPY controllers/ controllers/
COPY pkg/ pkg/
COPY internal/ internal/
COPY node-agent/ node-agent/
RUN GOOS=${TARGETOS:-linux} GOARCH=${TARGETARCH} go build -trimpath -tags timetzdata -ldflags=-s -o /out/xenferry-controller . && \
    GOOS=${TARGETOS:-linux} GOARCH=${TARGETARCH} go build -trimpath -ldflags=-s -o /out/node-agent ./node-agent

# Node agent, for dom0. It does not ship Xen's utilities: xl must be the
# host's own, because xl, libxl and libxenctrl talk to the running
# hypervisor and to xenstored through interfaces (domctl/sysctl, the libxl
# JSON and migration stream versions) that change between Xen releases; a
# Debian xen-utils in the image would match only hosts of that one release.
# The image's `xl` is a wrapper that runs the host's xl in the host's mount
# namespace (nsenter, from util-linux; the DaemonSet sets hostPID), so it
# finds the host's libraries, /dev/xen and the xenstored socket exactly as
# an administrator's shell does. The agent runs as root: the hypervisor's
# device nodes are root-only in dom0.
FROM debian:bookworm-slim AS node-agent
COPY --from=builder /out/node-agent /node-agent
COPY hack/image/xl-host.sh /usr/local/bin/xl
ENTRYPOINT ["/node-agent"]

# Controller: from scratch, a static binary and the files prepared above (no
# shell, no package manager), as user nonroot (65532). It only talks to the
# API server.
FROM scratch AS controller
COPY --from=builder /rootfs/ /
WORKDIR /
COPY --from=builder /out/xenferry-controller /xenferry-controller
USER 65532:65532
ENTRYPOINT ["/xenferry-controller"]
