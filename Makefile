# One entry point for building, testing and demonstrating the mesh.
# `make demo` brings the local cluster up with deploy/ applied; `make test` runs
# every module's unit tests and the end-to-end suite on the local cluster.

SHELL := /bin/bash
ROOT := $(abspath .)
export AMBIENT_CACHE ?= /var/cache/ambient-mesh
export AMBIENT_BIN ?= $(ROOT)/_output/bin
export AMBIENT_CLUSTER_DIR ?= /var/lib/ambient-mesh/cluster
export AMBIENT_IMAGE_TABLE ?= $(ROOT)/e2e/cluster/images.yaml
export KUBE_BIN ?= $(AMBIENT_CACHE)/kube-v1.36.3
export CNI_BIN ?= $(AMBIENT_CACHE)/cni-plugins-v1.9.1
KUBECTL := $(KUBE_BIN)/kubectl
KUBECONFIG_PATH := $(AMBIENT_CLUSTER_DIR)/kubeconfig
# Modules of the workspace; a module without packages yet is skipped.
MODULES := api bpf cni-plugin e2e istiod-lite pkg waypoint ztunnel
E2E_TIMEOUT ?= 30m

.PHONY: all build build-deps generate verify test test-unit test-e2e cluster cluster-down demo bench clean

all: build

## build: our binaries into _output/bin, static (CGO_ENABLED=0): they run on
## any node, and ztunnel does not map libc (~1.4 MiB of its resident memory).
## grpcnotrace leaves out gRPC's request tracing (golang.org/x/net/trace and
## the template packages): 2.2 MB less code for ztunnel to page in.
build:
	@mkdir -p $(AMBIENT_BIN)
	CGO_ENABLED=0 go build -tags grpcnotrace -o $(AMBIENT_BIN)/ ./e2e/cmd/... ./istiod-lite/cmd/... ./cni-plugin/cmd/... ./ztunnel/cmd/...

## build-deps: Kubernetes binaries and CNI plugins from the Go module proxy (cached)
build-deps:
	e2e/hack/build-kube.sh

## generate: regenerate the protobuf Go code
generate:
	hack/generate.sh
	bpf/generate.sh

## verify: generated code and CRDs match their sources
verify:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	hack/verify-generate.sh
	bpf/generate.sh --verify
	hack/sync-crds.sh --verify

## test: verify, unit tests of every module, end-to-end suite on the local cluster
test: verify test-unit test-e2e

# Kernel tests that attach eBPF programs mount bpffs at /sys/fs/bpf when it is
# not there; the machine is left as it was found.
test-unit:
	@pkgs=$$(for m in $(MODULES); do go list ./$$m/... 2>/dev/null; done); \
	  mounted=$$(stat -f -c %T /sys/fs/bpf 2>/dev/null); \
	  go vet $$pkgs && go test -count=1 $$pkgs; rc=$$?; \
	  rmdir /sys/fs/bpf/ambient 2>/dev/null; \
	  if [ "$$mounted" != bpf_fs ] && [ "$$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" = bpf_fs ]; then umount /sys/fs/bpf; fi; \
	  exit $$rc

test-e2e: build build-deps
	go test -p 1 -count=1 -tags e2e -timeout $(E2E_TIMEOUT) -v ./e2e/tests/... 2>&1 | tee _output/e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|\s+\S+_test.go)'; exit $${PIPESTATUS[0]}

## cluster: bring the local cluster up; prints `export KUBECONFIG=...`
cluster: build build-deps
	$(AMBIENT_BIN)/localcluster up

cluster-down:
	@if [ -x $(AMBIENT_BIN)/localcluster ]; then $(AMBIENT_BIN)/localcluster down; \
	  else go run ./e2e/cmd/localcluster down; fi

## demo: the cluster with deploy/ and a demo workload applied, shown
demo: cluster
	$(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) apply --server-side -k deploy/
	$(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) apply -f e2e/cluster/demo.yaml
	$(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) -n demo rollout status deployment/echo --timeout 60s
	$(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) -n demo wait pod/client --for condition=Ready --timeout 60s
	$(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) get nodes,pods,services -A -o wide
	@echo "# a request from the client pod to the echo Service's ClusterIP:"
	$(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) -n demo exec client -- \
	  $(AMBIENT_BIN)/load-client --target http://$$($(KUBECTL) --kubeconfig $(KUBECONFIG_PATH) -n demo get svc echo -o jsonpath='{.spec.clusterIP}')/ --requests 1 --print-body
	@echo "export KUBECONFIG=$(KUBECONFIG_PATH)"

## bench: benchmarks of the local cluster (pod creation to Ready)
bench: build build-deps
	go test -p 1 -tags e2e -run '^$$' -bench . -benchtime 20x ./e2e/tests/...

clean: cluster-down
	rm -rf _output
