# Operator targets (issue 5): tooling, code generation, envtest, local demo.
OPERATOR_BIN := $(CURDIR)/bin
CONTROLLER_GEN ?= $(OPERATOR_BIN)/controller-gen

.PHONY: tools manifests generate test-operator demo controlplane-up controlplane-down operator-build

## tools: build kube-apiserver, etcd and controller-gen into bin/ (cached; cold ~10 min)
tools:
	hack/tools.sh

## manifests: regenerate CRDs and RBAC from the kubebuilder markers: the
## controller's roles (controllers/rbac.go) into config/rbac/role.yaml, the
## node agent's (node-agent/rbac.go) into config/rbac/node_agent_role.yaml
manifests:
	hack/tools.sh controller-gen
	$(CONTROLLER_GEN) rbac:roleName=xenferry-controller crd paths=./api/... paths=./controllers/... \
		output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	$(CONTROLLER_GEN) rbac:roleName=xenferry-node-agent,fileName=node_agent_role.yaml paths=./node-agent/ \
		output:rbac:artifacts:config=config/rbac

## generate: regenerate deepcopy functions
generate:
	hack/tools.sh controller-gen
	$(CONTROLLER_GEN) object:headerFile=hack/boilerplate.go.txt paths=./api/...

operator-build:
	$(GO) build -o bin/xenferry-controller .
	$(GO) build -o bin/node-agent ./node-agent

## test-operator: the envtest suites against the built kube-apiserver and etcd
## (controller and agents; RBAC, admission policies and metrics in test/rbac)
test-operator: tools
	KUBEBUILDER_ASSETS=$(OPERATOR_BIN) $(GO) test -count=1 -timeout 20m ./controllers/... ./node-agent/... ./test/...

## demo: the first command of the README: local control plane, controller, two sim agents, sample migrations
demo:
	hack/demo.sh

controlplane-up:
	hack/controlplane.sh up
controlplane-down:
	hack/controlplane.sh down
