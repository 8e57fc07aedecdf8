# Repository checks: generated files in sync, modules tidy, formatting, vet.
.PHONY: verify help

## verify: regenerate CRDs, RBAC and deepcopy and fail on any difference; go mod tidy -diff, gofmt,
## no executables tracked, go vet
verify: manifests generate
	@changed=$$(git status --porcelain -- api config); \
	if [ -n "$$changed" ]; then \
		echo "verify: generated files are out of date (run 'make manifests generate' and commit):"; \
		echo "$$changed"; git --no-pager diff --stat -- api config; exit 1; fi
	@$(GO) mod tidy -diff >/dev/null || { echo "verify: go.mod/go.sum not tidy (run 'go mod tidy'):"; $(GO) mod tidy -diff; exit 1; }
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "verify: gofmt would change (run 'make fmt'):"; echo "$$unformatted"; exit 1; fi
	@bins=$$(git ls-files -z | xargs -0 -I{} sh -c 'f="{}"; [ -f "$$f" ] && head -c 4 "$$f" | grep -q ELF && echo "$$f"' ); \
	if [ -n "$$bins" ]; then echo "verify: executables tracked in git (build outputs belong in bin/, ignored):"; echo "$$bins"; exit 1; fi
	$(GO) vet ./...
	@echo "verify: generated files, modules, formatting, tracked binaries and vet are clean"

## help: list the targets with their help (the "## target: text" lines above each)
help:
	@awk 'function flush() { if (name != "") printf "  %-20s %s\n", name, text; name = "" } \
		/^## [a-zA-Z0-9_.-]+:/ { flush(); sub(/^## /, ""); i = index($$0, ": "); name = substr($$0, 1, i - 1); text = substr($$0, i + 2); next } \
		/^## / && name != "" { sub(/^## /, ""); text = text " " $$0; next } \
		{ flush() } END { flush() }' $(firstword $(MAKEFILE_LIST)) $(wildcard hack/mk/*.mk)
