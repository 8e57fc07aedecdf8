# xenferry Makefile. Feature areas add their targets in hack/mk/*.mk.
GO ?= go
export GOTOOLCHAIN := local

.PHONY: all build test vet fmt bench
all: build

build:
	$(GO) build ./...
	$(GO) build -o bin/node-agent ./node-agent

vet:
	$(GO) vet ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')

test:
	$(GO) test ./...

bench:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./pkg/...

-include hack/mk/*.mk
