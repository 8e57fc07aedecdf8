# Real Xen lab (issue 6): two Xen 4.17 hosts nested under QEMU (TCG), a PV
# domU on a shared disk, stock `xl migrate` against xenferry's transport.
# Needs root and ~4 GiB free RAM; takes many minutes; never part of CI.
.PHONY: xenlab-e2e xenlab-postcopy-e2e xenlab-operator-e2e xenlab-up xenlab-down xenlab-clean xenlab-verify-stream

## xenlab-e2e: build (first run, ~10 min) or reuse the lab, boot both hosts, migrate the domU with xl and with xenferry; one JSON line per method
xenlab-e2e:
	hack/xenlab/e2e.sh

## xenlab-postcopy-e2e: hosts on a hypervisor built with memory paging; the pager's own test, then a PVH domU a->b with stock xl, xenferry pre-copy and xenferry early resume; one JSON line per method
xenlab-postcopy-e2e:
	hack/xenlab/postcopy-e2e.sh

## xenlab-operator-e2e: control plane and controller here, an agent in each lab dom0; VMMigrations move the domU (apply, cancel, kill-target-agent); one JSON line per step
xenlab-operator-e2e:
	hack/xenlab/operator-e2e.sh

## xenlab-up: build the lab if needed and boot both hosts (left running; make xenlab-down stops them)
xenlab-up:
	hack/xenlab/deps.sh && hack/xenlab/build-rootfs.sh && hack/xenlab/build-domu.sh && hack/xenlab/hosts.sh up

## xenlab-down: stop both lab hosts
xenlab-down:
	hack/xenlab/hosts.sh down

## xenlab-clean: stop the hosts and remove hack/xenlab/.work (rootfs, images, caches)
xenlab-clean: xenlab-down
	rm -rf hack/xenlab/.work

## xenlab-verify-stream: check the streams pkg/xlstream rebuilds with Xen's verify-stream-v2 from the lab's dom0 tree (needs the rootfs: make xenlab-up once)
xenlab-verify-stream:
	PYTHONPATH=$(CURDIR)/hack/xenlab/.work/rootfs/usr/lib/xen-4.17/lib/python \
	XEN_VERIFY_STREAM=$(CURDIR)/hack/xenlab/.work/rootfs/usr/lib/xen-4.17/bin/verify-stream-v2 \
	$(GO) test -count=1 -run TestRebuiltStreamsPassXensVerifier -v ./pkg/xlstream/
