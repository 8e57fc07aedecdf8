# pkg/wire: stream format fuzzing and benchmarks.
WIRE_FUZZTIME ?= 60s

.PHONY: wire-fuzz wire-bench
wire-fuzz: ## Fuzz the wire decoder (WIRE_FUZZTIME=60s)
	nice -n 10 $(GO) test -run '^$$' -fuzz=FuzzReader -fuzztime=$(WIRE_FUZZTIME) -parallel 1 ./pkg/wire

wire-bench: ## Wire encode/decode benchmarks (MB/s counts page data)
	nice -n 10 $(GO) test -run '^$$' -bench . -benchmem ./pkg/wire
