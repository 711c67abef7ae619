# The commands README.md promises. Every target builds a fresh virtualenv in .venv from
# pinned requirements first, so nothing installed by hand on the machine is needed.
# torch==2.13.0 is pinned: it resolves to the local CPU wheel instead of gigabytes of CUDA
# wheels.
#
#   make test       the whole test suite (CI runs `make lint test`, via .ci/run)
#   make test-fast  the suite without tests marked slow (< 90 s on a 2-core machine)
#   make lint       ruff check and ruff format --check
#   make demo       the offline demo (train, merge, reload tiny adapters)
#   make bench      pytest-benchmark throughput reports
#   make clean      remove the virtualenv, build trees and the built extension modules

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The compiled modules are rebuilt whenever a kernel, binding or build file changes, so a
# test run never exercises stale binaries.
EXT_SOURCES := $(shell find csrc python -type f) CMakeLists.txt setup.py
EXT_STAMP := build/.extensions-built
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

.PHONY: install build demo test test-fast lint format bench clean

$(STAMP): requirements.txt requirements-test.txt requirements-build.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-build.txt -r requirements-test.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(EXT_STAMP): $(STAMP) $(EXT_SOURCES)
	$(BIN)/python setup.py --quiet build_ext --inplace
	mkdir -p build && touch $(EXT_STAMP)

install: $(STAMP)

build: $(EXT_STAMP)

demo: $(EXT_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/robustmerge demo

test: $(EXT_STAMP)
	$(PYTEST) tests -q

# the fast lane: no Java caption metrics, end-to-end eval, demo, benchmark smoke, and
# Triton-interpreter tests for one dtype only
test-fast: $(EXT_STAMP)
	$(PYTEST) tests -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(EXT_STAMP)
	$(BIN)/python -m pytest benchmarks -q

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	rm -f robustmerge_kernels/_cpu*.so robustmerge_kernels/_cuda*.so
