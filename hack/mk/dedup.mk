# pkg/dedup targets (issue 3 items 1-3): disk block index, classification,
# verified resolution on the destination.

.PHONY: dedup-test dedup-bench dedup-realdata

## dedup-test: unit tests of pkg/dedup with the race detector (a loop-device test runs as root)
dedup-test:
	$(GO) test -race -count 1 ./pkg/dedup

## dedup-bench: index build, Classify, Lookup, HashPage, IsZero and ResolveBatch benchmarks (writes a 512 MiB temp image)
dedup-bench:
	nice -n 10 $(GO) test -run '^$$' -bench . -benchtime 2s -count 1 ./pkg/dedup

## dedup-realdata: classify the guest-image RAM dumps against their disks with pkg/dedup and resolve every reference (needs `make guest-image`)
dedup-realdata:
	XENFERRY_DEDUP_MEM=$(CURDIR)/hack/guestimage/.work/mem.raw XENFERRY_DEDUP_DISK=$(CURDIR)/hack/guestimage/.work/disk.raw \
		$(GO) test -count 1 -v -run TestRealGuestDump ./pkg/dedup
	XENFERRY_DEDUP_MEM=$(CURDIR)/hack/guestimage/.work/mem-idle.raw XENFERRY_DEDUP_DISK=$(CURDIR)/hack/guestimage/.work/disk-idle.raw \
		$(GO) test -count 1 -v -run TestRealGuestDump ./pkg/dedup
