# pkg/dedup targets (issue 3 items 1-3): disk block index, classification,
# verified resolution on the destination.

.PHONY: dedup-test dedup-bench

## dedup-test: unit tests of pkg/dedup with the race detector (a loop-device test runs as root)
dedup-test:
	$(GO) test -race -count 1 ./pkg/dedup

## dedup-bench: index build, Classify, Lookup, HashPage, IsZero and ResolveBatch benchmarks (writes a 512 MiB temp image)
dedup-bench:
	nice -n 10 $(GO) test -run '^$$' -bench . -benchtime 2s -count 1 ./pkg/dedup
