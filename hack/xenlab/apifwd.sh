#!/usr/bin/env bash
# apifwd.sh: QEMU's guestfwd runs this for each connection a dom0 opens to
# the lab's API address (LAB_API_IP:6443; .2 and .3 of the control network
# are QEMU's own): it relays to the local control plane's kube-apiserver,
# whose port is read at connect time, so hosts booted before the control
# plane reach it too.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
exec socat - "TCP:127.0.0.1:$(cat "$ROOT/.xenferry/controlplane/port")"
