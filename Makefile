# sovereign-operator: `make test` runs every test, `make demo` shows the operator
# at work on a local cluster. Tools (Kubernetes binaries, kwok, helm) are built
# from Go modules by e2e/cluster into a cache outside the checkout.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
CHART := charts/sovereign-operator
TOOLS = eval "$$(e2e/cluster tools)"

.PHONY: all build image test lint unit crds check-crds chart e2e demo demo-contention demo-down cluster-up cluster-down clean

all: build

build:
	$(CARGO) build --bin sovereign-operator

## image: the operator image without Docker or a registry (e2e/image): the static binary the
## e2e suite runs, in a FROM-scratch image built with buildah, as target/image/sovereign-operator.oci.tar;
## loaded into the dev cluster's real node when that cluster runs. (Users: see the Dockerfile.)
image:
	e2e/image

## test: everything CI runs, in order of cost.
test: lint unit check-crds chart e2e

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test -p sovereign-operator

## crds: regenerate crds/ and the chart's CRD templates from the Rust types.
crds:
	$(CARGO) run -q --bin sovereign-operator -- crd --out-dir crds
	$(CARGO) run -q --bin sovereign-operator -- crd --helm --out-dir $(CHART)/templates/crds

## check-crds: fail when the committed CRD YAML differs from the types.
check-crds:
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(CARGO) run -q --bin sovereign-operator -- crd --out-dir "$$tmp/crds"; \
	$(CARGO) run -q --bin sovereign-operator -- crd --helm --out-dir "$$tmp/helm"; \
	diff -ru "$$tmp/crds" crds && diff -ru "$$tmp/helm" $(CHART)/templates/crds \
	  || { echo "CRD YAML is out of date: run 'make crds' and commit the result" >&2; exit 1; }
	@echo "CRD YAML matches the types"

## chart: helm lint, render, and check that bad values are refused.
chart:
	@$(TOOLS); \
	"$$HELM" lint --strict $(CHART); \
	"$$HELM" template t $(CHART) >/dev/null; \
	"$$HELM" template t $(CHART) --set leaderElection.enabled=true,replicaCount=2 >/dev/null; \
	monitored=$$("$$HELM" template t $(CHART) --set metrics.serviceMonitor.enabled=true,metrics.networkPolicy.enabled=true); \
	[[ "$$monitored" == *$$'\nkind: ServiceMonitor\n'* ]] || { echo "chart did not render the ServiceMonitor" >&2; exit 1; }; \
	if "$$HELM" template t $(CHART) --set leaderElection.renewDeadlineSeconds=15 >/dev/null 2>&1; then \
	  echo "chart accepted a renew deadline not shorter than the lease duration" >&2; exit 1; fi; \
	dash=$$("$$HELM" template t $(CHART) --set dashboard.enabled=true --show-only templates/dashboard.yaml); \
	[[ "$$dash" == *'grafana_dashboard: "1"'* && "$$dash" == *'"uid": "sovereign-operator"'* ]] \
	  || { echo "chart: dashboard.enabled=true renders no Grafana dashboard ConfigMap" >&2; exit 1; }; \
	netpol=$$("$$HELM" template t $(CHART) --show-only templates/networkpolicy.yaml); \
	[[ "$$netpol" == *'ingress: []'* ]] \
	  || { echo "chart: the default NetworkPolicy must admit no pod to the operator" >&2; exit 1; }; \
	[[ $$("$$HELM" template t $(CHART) | grep -c '^kind: ValidatingAdmissionPolicy$$') == 7 ]] \
	  || { echo "chart: the operator's admission policies are not rendered by default" >&2; exit 1; }; \
	[[ $$("$$HELM" template t $(CHART) | grep -c '^kind: MutatingAdmissionPolicy$$') == 1 ]] \
	  || { echo "chart: the policy that holds labelled workloads is not rendered by default" >&2; exit 1; }; \
	if "$$HELM" template t $(CHART) --show-only templates/workload-policies.yaml | grep -q 'resource-policy'; then \
	  echo "chart: the workload policies must be removed by helm uninstall (no resource-policy)" >&2; exit 1; fi; \
	if "$$HELM" template t $(CHART) --set replicaCount=2 >/dev/null 2>&1; then \
	  echo "chart accepted replicaCount=2 without leader election" >&2; exit 1; fi; \
	if "$$HELM" template t $(CHART) --set logging.format=xml >/dev/null 2>&1; then \
	  echo "chart accepted logging.format=xml" >&2; exit 1; fi; \
	echo "chart: lint, template and values schema OK"

## e2e: the real-cluster suite (builds the image, brings the dev cluster up and down unless one
## runs, loads the image into its real node).
e2e:
	e2e/run

cluster-up:
	e2e/cluster up

cluster-down:
	e2e/cluster down

## demo: dev cluster, chart, operator, examples, and what the operator made of them.
demo: build
	e2e/demo

## demo-contention: after make demo, one oversubscribed pool shared by two teams (borrowing,
## reclaim, priority preemption, fair share), told by kubectl get and Events.
demo-contention: build
	e2e/demo-contention

demo-down:
	e2e/demo stop

clean: cluster-down
	$(CARGO) clean
