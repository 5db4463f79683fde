# The README's two commands: `make demo` and `make test`. Each sets itself up.
# `make test` also executes notebooks/*.ipynb (tests/test_notebooks.py), so
# one command, one report and one time budget cover the library and them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# `ntkjax compare` with its defaults (~2-3 min on 2 CPU cores), each run in a
# fresh folder: demo_output/compare-<date-time>/report.html, results.json, PNGs.
demo: setup
	$(PY) -m ntkjax compare --out demo_output/compare-$$(date +%Y%m%d-%H%M%S)

# One OpenBLAS thread: with XLA's own threads on a 2-core machine, OpenBLAS's
# spinning threads made LAPACK calls 10-50x slower (DESIGN.md, predict).
# Test files run in parallel, one worker per core, each file on one worker
# (its compiled-function caches stay warm).
test: setup
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile tests --durations=25

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
