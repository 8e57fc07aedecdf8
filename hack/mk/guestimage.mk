# Real guest memory data (issue 3 item 5): a Debian guest under QEMU TCG, its
# RAM dumps and disk image, and memscan to classify them. For benchmarks, not CI.
GUESTIMAGE_WORK := $(CURDIR)/hack/guestimage/.work

.PHONY: guest-image guest-image-clean memscan memscan-test

## guest-image: build the Debian guest, run its workload, save .work/{mem,disk}.raw and .work/{mem,disk}-idle.raw (cold ~5 min, cached)
guest-image:
	hack/guestimage/build.sh all

## guest-image-clean: remove hack/guestimage/.work (rootfs, images, dumps)
guest-image-clean:
	hack/guestimage/build.sh clean

## memscan: classify the guest-image dumps (zero / on disk / other), after the workload and idle after boot
memscan: guest-image
	$(GO) run ./hack/memscan -fine 512 -mem $(GUESTIMAGE_WORK)/mem.raw -disk $(GUESTIMAGE_WORK)/disk.raw
	$(GO) run ./hack/memscan -fine 512 -mem $(GUESTIMAGE_WORK)/mem-idle.raw -disk $(GUESTIMAGE_WORK)/disk-idle.raw

## memscan-test: unit tests of memscan and the capture helper
memscan-test:
	$(GO) test ./hack/memscan/... ./hack/guestimage/...

.PHONY: guest-image-variants guest-measure

## guest-image-variants: one guest run per workload profile (default, read-heavy, write-heavy, app-heap) into .work/variants/ (cold ~8 min, ~12 GiB)
guest-image-variants:
	hack/guestimage/build.sh variants

## guest-measure: memscan fractions and migbench wire bytes (precopy vs precopy+dedup) for every saved dump, as a Markdown table
guest-measure:
	MIGBENCH=1 hack/guestimage/measure.sh
