# The two commands of the README do all set-up on a fresh machine:
#   make demo   build, then run the main job on the embedded default model
#   make test   build, then run the Rust core tests and the Python tests
# Both are idempotent: the venv is rebuilt only when pyproject.toml changes,
# the extension only when Rust or CUDA sources change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
EXT    := $(VENV)/.ext-built
SOURCES := $(shell find rust cuda -type f \( -name '*.rs' -o -name '*.cu' -o -name 'Cargo.toml' \) 2>/dev/null) Cargo.toml Cargo.lock pyproject.toml
# NVRTC from pip's CUDA wheels, so the kernel-compile tests run without a toolkit
# (absolute: cargo runs the test binaries from the crate folder).
NVRTC_DIR = $(abspath $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/nvidia/cu*/lib) $(wildcard $(VENV)/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib)))

.PHONY: all build demo test test-rust test-python test-gpu bench wheel clean

all: build

# torch pulls several GB of CUDA wheels; below 20 GB free, skip pip's cache
# so they are not stored twice.
PIP_CACHE = $(shell test "$$(df -Pk . | awk 'NR==2 {print $$4}')" -lt 20000000 && echo --no-cache-dir)

$(DEPS): pyproject.toml scripts/deps.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_CACHE) --upgrade pip
	$(PY) scripts/deps.py test dev > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet $(PIP_CACHE) -r $(VENV)/requirements.txt
	touch $@

$(EXT): $(DEPS) $(SOURCES)
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(EXT)

demo: build
	$(VENV)/bin/ferrox doctor --allow-missing-cuda
	$(VENV)/bin/ferrox inspect
	$(PY) -m ferrox.demo

test-rust: $(DEPS)
	FERROX_REQUIRE_SIM=1 LD_LIBRARY_PATH=$(NVRTC_DIR):$$LD_LIBRARY_PATH cargo test --release -p ferrox-core

# Two worker processes (one per core of a 2-core CI box); tests that share an
# expensive module fixture stay on one worker (PINNED_FILES in tests/conftest.py).
# HYPOTHESIS_PROFILE=ci|dev|long sets the property-test budgets.
test-python: build
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test: test-rust test-python

# On the GPU machine (after installing the wheel): only the CUDA tests.
test-gpu:
	$(PY) -m pytest -q -m gpu tests

bench: build
	$(PY) benches/run.py

wheel: $(DEPS)
	$(VENV)/bin/maturin build --release --out dist

clean:
	cargo clean
	rm -rf $(VENV) dist python/ferrox/_core*.so
