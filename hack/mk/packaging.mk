# Packaging: container images, manifests against a real API server, alerts.
.PHONY: image-smoke deploy-check prometheus-check

## image-smoke: build the Dockerfile's controller and node-agent targets with
## buildah (local stand-in base images, cached in .cache/) and run their binaries
image-smoke:
	hack/image-smoke.sh

## deploy-check: server-side dry run of config/default and the samples against
## the local control plane (CRDs applied first); also checks the alert rules
deploy-check: tools prometheus-check
	hack/deploy-check.sh

## prometheus-check: promtool check rules on config/prometheus (installs
## Debian's prometheus package for promtool when missing)
prometheus-check:
	hack/prometheus-check.sh
