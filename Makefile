# radmark — every target sets itself up: a fresh machine needs only `make demo` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.radmark-installed
# torch/torchvision are pinned to tested builds (README.md, "Install", has the CPU-only alternative).
TORCH   := torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-fast lint format bench bench-quick bench-gpu bench-gpu-prepare clean

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
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

# the power map on CPU (bench/map.py): about 5 core-hours (2-3 h on 2 idle cores), resumable (rerun to continue),
# one stage with `python -m bench.map --stage NAME`; writes bench/results/map-*.json and
# docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python -m bench.map $(BENCH_ARGS)

# The GPU run (issue #14): prepare what the offline GPU machine lacks here, then run
# `bash bench/gpu.sh` there (it is what `make bench-gpu` runs; at most 8 minutes on one H100).
GPU_CARRY := bench/work/gpu-carry
GPU_WHEELS := cryptography cffi pycparser braceexpand
bench-gpu-prepare: $(STAMP)
	mkdir -p $(GPU_CARRY)/wheels $(GPU_CARRY)/fmnist
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_CARRY)/wheels $(GPU_WHEELS)
	rm -f $(GPU_CARRY)/wheels/radmark-*.whl
	$(BIN)/python -m pip wheel -q --no-deps -w $(GPU_CARRY)/wheels .
	$(BIN)/python -c "from bench import fmnist; fmnist.ensure_installed()"
	cp /usr/share/datasets/fashion-mnist/*.gz $(GPU_CARRY)/fmnist/
	test -f $(GPU_CARRY)/glyph-masters.npz || \
		$(BIN)/python -m bench.glyphs masters --classes 1000 --out $(GPU_CARRY)/glyph-masters.npz
	cp ../shared/tools/mark_roofline.py $(GPU_CARRY)/

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
