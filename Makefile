# radmark — every target sets itself up: a fresh machine needs only `make demo` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.radmark-installed
# torch/torchvision are pinned to the builds this machine keeps on local disk (see DEVELOPERS.md).
TORCH   := torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-fast lint format bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m radmark.demo demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

# everything but the end-to-end tests and the long null calibrations (a couple of minutes)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check radmark tests bench
	$(BIN)/ruff format --check radmark tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format radmark tests bench
	$(BIN)/ruff check --fix radmark tests bench

# the few-minute smoke test of the whole chain (2,000 images): says nothing about power
bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

# the power map on CPU (bench/map.py): <= 2 h on 2 cores, resumable (rerun to continue),
# one stage with `python -m bench.map --stage NAME`; writes bench/results/map-*.json and
# docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python -m bench.map

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
