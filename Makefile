# sovereign-operator: `make test` runs every test, `make demo` shows the operator
# at work on a local cluster. Tools (Kubernetes binaries, kwok, helm) are built
# from Go modules by e2e/cluster into a cache outside the checkout.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
CHART := charts/sovereign-operator
TOOLS = eval "$$(e2e/cluster tools)"

.PHONY: all build image test lint shellcheck deny advisories release unit crds check-crds chart chart-readme docs e2e demo demo-contention demo-down cluster-up cluster-down clean

all: build

build:
	$(CARGO) build --bin sovereign-operator

## image: the operator image without Docker or a registry (e2e/image): the static binary the
## e2e suite runs, in a FROM-scratch image built with buildah, as target/image/sovereign-operator.oci.tar;
## loaded into the dev cluster's real node when that cluster runs. (Users: see the Dockerfile.)
image:
	e2e/image

## test: everything CI runs, in order of cost.
test: lint unit check-crds chart docs e2e

## lint: formatting, clippy, shellcheck of every shell script, and cargo-deny (licenses, bans,
## sources; the advisories need the network: make advisories).
lint: shellcheck
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@$(MAKE) --no-print-directory deny

## deny: cargo-deny's licenses, bans (one version of each crate, no wildcards) and sources checks
## (deny.toml), offline: from Cargo.lock and the crates `cargo fetch` brings (every platform's,
## windows-sys too: clippy fetches only this host's, and a fresh cargo home has no others).
## cargo-deny itself is installed by scripts/tool into the tool cache, once.
deny:
	@$(CARGO) fetch --locked --quiet
	@deny=$$(scripts/tool cargo-deny); \
	"$$deny" --offline --locked check licenses bans sources; \
	echo "cargo-deny: licenses, bans and sources OK"; \
	echo "cargo-deny: WARNING: security advisories NOT checked here (the RustSec database needs the network): run 'make advisories' where it is reachable" >&2

## advisories: cargo-deny's advisories check against the RustSec database, fetched from the
## network (fails when it cannot be fetched); not part of `make test`, which runs offline.
advisories:
	scripts/advisories

## release: cut a release into dist/VERSION/ (binaries, plugin archives, images, SBOMs, chart,
## krew manifest, checksums; push and sign on request): scripts/release, docs: Releases.
release:
	scripts/release

## shellcheck: every tracked shell script (by name or by its #! line); shellcheck itself is
## installed from Debian's packages by scripts/tool when missing.
shellcheck:
	@sc=$$(scripts/tool shellcheck); scripts=(); \
	while IFS= read -r -d '' f; do \
	  first=$$(head -n1 "$$f" 2>/dev/null | tr -d '\0' || true); \
	  if [[ "$$f" == *.sh || "$$first" =~ ^\#!.*[/\ ](ba)?sh([[:space:]].*)?$$ ]]; then scripts+=("$$f"); fi; \
	done < <(git ls-files -z); \
	"$$sc" -x "$${scripts[@]}"; \
	echo "shellcheck: $${#scripts[@]} scripts clean"

## docs: the book (mdBook, from docs/ with the API and CLI references generated from the CRDs
## and the command line) into target/book/; fails on a CRD field missing from the reference
## and on a broken internal link (of the book, the README and the changelog).
docs:
	@mdbook=$$(scripts/tool mdbook); \
	rm -rf target/book-src target/book; mkdir -p target; cp -r docs target/book-src; \
	$(CARGO) run -q --bin sovereign-operator -- docs --out-dir target/book-src/reference; \
	log=$$("$$mdbook" build target/book-src --dest-dir "$(CURDIR)/target/book" 2>&1) || { echo "$$log" >&2; exit 1; }; \
	if grep -E 'WARN|ERROR' <<<"$$log" >&2; then echo "docs: mdBook warned (above)" >&2; exit 1; fi; \
	scripts/check-links target/book README.md CHANGELOG.md

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

## chart: helm lint; the chart's unit tests (helm-unittest, charts/sovereign-operator/tests:
## defaults, refused values, the rendered objects); its README against its values (helm-docs);
## one version for chart, app and crate; and the PrometheusRule's alerts tested with
## Prometheus' own rule engine (promtool, from Debian's package: e2e/prometheus).
chart:
	@$(TOOLS); \
	"$$HELM" lint --strict $(CHART); \
	"$$(scripts/tool helm-unittest)" --strict --color=false $(CHART); \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cp -r $(CHART) "$$tmp/"; \
	"$$(scripts/tool helm-docs)" --log-level=warning --chart-search-root "$$tmp" --template-files README.md.gotmpl; \
	diff -u $(CHART)/README.md "$$tmp/sovereign-operator/README.md" \
	  || { echo "chart: README.md is out of date with values.yaml: run 'make chart-readme' and commit it" >&2; exit 1; }; \
	version=$$(sed -n 's/^version: *//p' $(CHART)/Chart.yaml); \
	app=$$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' $(CHART)/Chart.yaml); \
	crate=$$(sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1); \
	[[ "$$version" == "$$app" && "$$app" == "$$crate" ]] \
	  || { echo "chart: version $$version, appVersion $$app and the crate's $$crate must be one version" >&2; exit 1; }; \
	"$$HELM" template t $(CHART) --show-only templates/prometheusrule.yaml \
	  --set metrics.prometheusRule.enabled=true,metrics.prometheusRule.job=sovereign \
	  | sed -n '/^spec:/,$$p' | tail -n +2 | sed 's/^  //' > "$$tmp/rules.yaml"; \
	cp charts/tests/alerts.test.yaml "$$tmp/"; \
	promtool="$$(dirname "$$(e2e/prometheus)")/promtool"; \
	"$$promtool" check rules "$$tmp/rules.yaml" >/dev/null; \
	"$$promtool" test rules "$$tmp/alerts.test.yaml"; \
	echo "chart: lint, unit tests, README and alerts OK"

## chart-readme: regenerate the chart's README from the comments in its values.yaml (helm-docs).
chart-readme:
	"$$(scripts/tool helm-docs)" --log-level=warning --chart-search-root charts --template-files README.md.gotmpl

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
