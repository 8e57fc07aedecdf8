#!/bin/sh
# xl in the node-agent image: runs the host's xl in the host's mount, UTS and
# IPC namespaces (PID 1 is the host's init: the DaemonSet sets hostPID), so
# that the toolstack always matches the running hypervisor. XL_HOST_PATH
# names it when it is not on the host's PATH.
exec nsenter --target 1 --mount --uts --ipc -- "${XL_HOST_PATH:-xl}" "$@"
