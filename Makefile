# The README's two commands: `make train` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint unit bench clean helm browser golden readme-table demo-k8s

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,operator,eval]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/dlmoe train

test: $(STAMP) lint helm browser
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest -m unit

# Rewrite the golden loss curves (tests/golden/) from a fresh run of their test, then show what changed.
golden: $(STAMP)
	DLMOE_REWRITE_GOLDEN=1 $(BIN)/pytest -q tests/unit/test_golden.py
	@git --no-pager diff --stat -- tests/golden
	@git --no-pager diff --word-diff=plain -- tests/golden

# The README's "What happens when…" table, rendered from the fault and bad-input tests it names.
readme-table: $(STAMP)
	$(BIN)/python -m tests.reliability_table

# The chart tests run the real helm, the Kubernetes e2e test the real kubectl: those on the PATH, else both fetched
# into .tools/ (DESIGN.md §5).
helm:
	@(command -v helm && command -v kubectl) >/dev/null 2>&1 || (test -x .tools/helm && test -x .tools/kubectl) || \
		$(PYTHON) .ci/fetch_helm.py .tools

# The dashboard's e2e test drives Debian's chromium headless through playwright (DESIGN.md §5).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The Kubernetes path on one box (README "Before there is a cluster"): emulated API server, KubeRay test double,
# a Ray head, MLflow, S3 and the operator; the example applied and followed to its end. DEMO_ARGS: see --help.
demo-k8s: $(STAMP) helm
	$(BIN)/python -m tests.e2e.demo_k8s $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Benchmarks as BENCHMARKS.md reports them (default glibc allocator; see there for the tuned-allocator run).
bench: $(STAMP)
	$(BIN)/python bench/moe_layer.py
	$(BIN)/python bench/experts_scaling.py
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/training.py

clean:
	rm -rf $(VENV) runs mlruns .pytest_cache .mypy_cache .ruff_cache .tools
