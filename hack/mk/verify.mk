# Repository checks: generated files in sync, modules tidy, formatting, vet.
.PHONY: verify help

## verify: regenerate CRDs, RBAC and deepcopy and fail on any difference; go mod tidy -diff, gofmt, go vet
verify: manifests generate
	@changed=$$(git status --porcelain -- api config); \
	if [ -n "$$changed" ]; then \
		echo "verify: generated files are out of date (run 'make manifests generate' and commit):"; \
		echo "$$changed"; git --no-pager diff --stat -- api config; exit 1; fi
	@$(GO) mod tidy -diff >/dev/null || { echo "verify: go.mod/go.sum not tidy (run 'go mod tidy'):"; $(GO) mod tidy -diff; exit 1; }
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "verify: gofmt would change (run 'make fmt'):"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	@echo "verify: generated files, modules, formatting and vet are clean"

## help: list the targets with a line of help each
help:
	@awk '/^## [a-zA-Z0-9_.-]+:/ { sub(/^## /, ""); split($$0, a, ": "); printf "  %-24s %s\n", a[1], substr($$0, length(a[1]) + 3) }' \
		$(firstword $(MAKEFILE_LIST)) $(wildcard hack/mk/*.mk)
