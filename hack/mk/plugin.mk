# kubectl plugin (issue 12): `kubectl xenferry` (cmd/kubectl-xenferry,
# docs/kubectl-plugin.md). kubectl runs any executable named kubectl-NAME
# found on PATH as `kubectl NAME`.
PLUGIN := kubectl-xenferry
PREFIX ?=

.PHONY: build-plugin install-plugin test-plugin

## build-plugin: build the plugin into bin/kubectl-xenferry
build-plugin:
	$(GO) build -o bin/$(PLUGIN) ./cmd/kubectl-xenferry

## install-plugin: build it; with PREFIX=DIR also install it as
## DIR/bin/kubectl-xenferry (PREFIX=$$HOME/.local for ~/.local/bin),
## without PREFIX say how to put bin/ on PATH
install-plugin: build-plugin
ifeq ($(strip $(PREFIX)),)
	@echo "Built bin/$(PLUGIN). kubectl finds plugins on PATH; either"
	@echo "  export PATH=\"$(CURDIR)/bin:\$$PATH\""
	@echo "or install it into a directory on PATH:"
	@echo "  make install-plugin PREFIX=\$$HOME/.local    # ~/.local/bin/$(PLUGIN)"
	@echo "then: kubectl xenferry --help"
else
	install -d "$(PREFIX)/bin"
	install -m 0755 bin/$(PLUGIN) "$(PREFIX)/bin/$(PLUGIN)"
	@case ":$$PATH:" in *":$(abspath $(PREFIX))/bin:"*) echo "Installed $(PREFIX)/bin/$(PLUGIN): run kubectl xenferry --help";; \
	  *) echo "Installed $(PREFIX)/bin/$(PLUGIN); $(PREFIX)/bin is not on PATH: export PATH=\"$(abspath $(PREFIX))/bin:\$$PATH\"";; esac
endif

## test-plugin: the plugin's rendering tests and its envtest suite (real kube-apiserver)
test-plugin: tools
	KUBEBUILDER_ASSETS=$(CURDIR)/bin $(GO) test -count=1 ./cmd/kubectl-xenferry/
