# xenferry Makefile. Feature areas add their targets in hack/mk/*.mk.
GO ?= go
export GOTOOLCHAIN := local

.PHONY: all build test vet fmt bench fuzz
all: build

build:
	$(GO) build ./...
	$(GO) build -o bin/node-agent ./node-agent

vet:
	$(GO) vet ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')

## test: every package's tests, the envtest suite included (builds the
## control-plane tools into bin/ first; cached after the first run)
test: tools
	KUBEBUILDER_ASSETS=$(CURDIR)/bin $(GO) test -count=1 -timeout 45m ./...

## fuzz: every fuzz target (found by hack/fuzz.sh), one at a time, for
## FUZZTIME each, from its committed corpus under testdata/fuzz; a failing
## input is left there. FUZZ_MATCH=regexp picks targets.
FUZZTIME ?= 10s
fuzz:
	FUZZTIME=$(FUZZTIME) hack/fuzz.sh

## bench: micro-benchmarks (hashing, record encoding, classification, ...)
## and the migration benchmark at 256 MiB
bench:
	$(GO) test -run '^$$' -bench . ./pkg/...
	$(GO) run ./hack/migbench -memory 256Mi

# xenlab-e2e is named here so that it is found in this file; its recipe is in
# hack/mk/xenlab.mk (the real-Xen lab; many minutes; not in CI).
xenlab-e2e:

-include hack/mk/*.mk
