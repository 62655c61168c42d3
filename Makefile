# Two commands on a fresh machine: `make test` and `make demo`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.chronos-installed

.PHONY: setup test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check chronos tests examples
	$(VENV)/bin/mypy chronos

test: lint
	$(VENV)/bin/pytest

demo: $(STAMP)
	$(VENV)/bin/chronos demo

bench: $(STAMP)
	$(PY) -m chronos.benchmarks.hypergrad
	$(PY) -m chronos.benchmarks.scaling
	$(PY) -m chronos.benchmarks.communication
	$(PY) -m chronos.benchmarks.continuum
	$(PY) -m chronos.benchmarks.staleness
	$(PY) -m chronos.benchmarks.hybrid
	$(PY) -m chronos.benchmarks.load
	$(PY) -m chronos.benchmarks.headline --full
	rm -f results/protocol*.json
	for i in 1 2 3; do $(PY) -m chronos.benchmarks.protocol --out results/protocol_$$i.json || exit 1; done
	$(PY) -m chronos.benchmarks.report

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
