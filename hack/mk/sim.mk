# Simulated Xen host (pkg/xenmem/sim): tests and benchmarks.
.PHONY: test-sim bench-sim

test-sim:
	$(GO) test -count=1 ./pkg/xenmem/sim

bench-sim:
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 300x ./pkg/xenmem/sim
