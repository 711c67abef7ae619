# The two commands README.md promises: `make demo` (install + main job) and `make test`
# (install + test suite). Both build a fresh virtualenv in .venv from pinned requirements,
# so nothing installed by hand on the machine is needed. torch==2.13.0 is pinned: it
# resolves to the local CPU wheel instead of gigabytes of CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): requirements.txt requirements-test.txt requirements-build.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-build.txt -r requirements-test.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/robustmerge demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

# the fast lane: no Java caption metrics, end-to-end eval, demo, benchmark smoke, and
# Triton-interpreter tests for one dtype only
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
