# The README's two commands: `make demo` and `make test`. Each sets itself up.
# `make test` also executes notebooks/*.ipynb (tests/test_notebooks.py), so
# one command, one report and one time budget cover the library and them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: setup demo test bench docs clean

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

# The API reference (mkdocs.yml, docs/) into site/. The `docs` extra goes into
# the same .venv (created if missing), with its own stamp. --strict turns
# every warning into an error, griffe's included: a docstring that documents
# a parameter the signature no longer has fails the build.
$(DOCS_STAMP): pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about MkDocs 2.0 / its end
# of life, printed on every build, is not a build warning.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info site
