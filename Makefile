# The README's two commands: `make train` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint unit bench clean helm browser golden readme-table

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

# The chart tests run the real helm: the one on the PATH, else helm v4 fetched into .tools/ (DESIGN.md §5).
helm:
	@command -v helm >/dev/null 2>&1 || test -x .tools/helm || $(PYTHON) .ci/fetch_helm.py .tools

# The dashboard's e2e test drives Debian's chromium headless through playwright (DESIGN.md §5).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

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
