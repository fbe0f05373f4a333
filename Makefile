# detstream: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := protos/detstream/v1/wire.proto protos/detstream/v1/control.proto

.PHONY: help install test lint protos crd tools cluster cluster-down image chart bench run fresh-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The stamp is written only after a complete install, so an interrupted one is redone, never trusted.
$(VENV)/.installed: pyproject.toml
	bash .ci/python-venv $(PYTHON) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install detstream with its test tools

OUT ?= out
run: install ## run the example session locally, results in out/ (make run OUT=DIR: elsewhere; never overwritten)
	$(BIN)/detstream run examples/4dstem-local.yaml --output $(OUT)/ --report $(OUT)/report.json

test: install tools ## run the whole test suite (installs the tools and builds the API server it needs first)
	@[ "$${DETSTREAM_SKIP_CLUSTER:-0}" = 1 ] || bash tests/cluster/build.sh
	$(BIN)/python -m pytest -q tests

lint: install tools ## ruff, mypy, import contracts, actionlint, hadolint, helm lint, promtool check rules
	$(BIN)/ruff check .
	PYTHON=$(BIN)/python bash .ci/mypy
	$(BIN)/lint-imports
	.tools/bin/actionlint
	.tools/bin/hadolint Dockerfile
	.tools/bin/helm lint --strict charts/detstream
	promtool check rules charts/detstream/alerts/detstream-rules.yaml

protos: install ## regenerate the committed protobuf/gRPC code from protos/
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos protos/detstream/v1/wire.proto
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos protos/detstream/v1/control.proto

crd: install ## regenerate the CRD (charts/detstream/crds/) and the README's manifest reference
	@mkdir -p charts/detstream/crds
	$(BIN)/python -m detstream.operator.crd > charts/detstream/crds/streamingsessions.yaml
	$(BIN)/python -m detstream.operator.crd --readme README.md

tools: ## install helm, kubectl, actionlint, hadolint into .tools/bin, and the Debian packages the tests call
	bash .ci/install-tools

image: ## build the image for this machine (needs Docker with buildx)
	docker buildx build --load --build-arg VERSION=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) -t detstream:dev .

chart: tools ## lint the Helm chart and package it into dist/
	.tools/bin/helm lint --strict charts/detstream
	.tools/bin/helm package charts/detstream --destination dist

cluster: ## start a real etcd + kube-apiserver on 127.0.0.1 (builds v1.20.2 once, cached)
	bash tests/cluster/up.sh

cluster-down: ## stop the control plane started by `make cluster`
	bash tests/cluster/down.sh

fresh-check: ## the README's two commands on a fresh Debian root filesystem (root, ~40 min)
	bash .ci/fresh-check

bench: install ## run every benchmark; prints ratios, writes benchmarks/results/*.json
	$(BIN)/python -m benchmarks
