# make book   set up, run every notebook on the embedded models, build the offline site
# make test   set up, run the whole test suite
# make test-fast  the unit tests only (no notebooks, no book build, no browser)
# make lint   ruff (lint and format check), pyright (basic) on the package, notebooks stored without outputs, actionlint on the workflows
# make typecheck  pyright alone (also part of make lint)
# make test-wheel  the wheel scenario (fresh virtual environment; slow, not in make test)
# make wheel  build the wheel (with the book template and its offline JavaScript) into dist/
# make test-families  every MoE family of the installed transformers: regenerate the coverage page (slow)
# make screenshots  screenshots of the built book (intro, a per-model page light and dark) into screenshots/
# make lab    JupyterLab on notebooks/
# make clean  remove build outputs (keeps .venv and node_modules; `make distclean` removes them)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
INSTALLED := $(VENV)/.moe-book-installed
LAB_INSTALLED := $(VENV)/.moe-book-lab-installed
LINT_INSTALLED := $(VENV)/.moe-book-lint-installed
NOTEBOOKS := $(wildcard notebooks/*.ipynb tests/fixtures/notebooks/*.ipynb)
VENDORED := book/_extra/vendor/.vendored
VEGA_BUNDLE := book/_static/vega-bundle.js

.PHONY: help setup vendor run build book test test-fast lint lint-workflows screenshots typecheck test-wheel wheel test-families lab clean distclean

help:
	@sed -n 's/^# \(make .*\)/\1/p' Makefile

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that pip never resolves it to a multi-GB CUDA build on its own.
$(INSTALLED): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[book,test]'
	touch $@

$(VENDORED): package.json package-lock.json scripts/vendor.sh
	@command -v npm >/dev/null || { echo "npm is needed to copy the site's JavaScript (Debian: apt-get install npm)" >&2; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts
	bash scripts/vendor.sh
	touch $@

$(VEGA_BUNDLE): $(INSTALLED)
	$(BIN)/python -c "from moe_utils.publish.render import write_vega_bundle; write_vega_bundle('$@')"

vendor: $(VENDORED) $(VEGA_BUNDLE)

setup: $(INSTALLED) vendor

run: setup
	$(BIN)/moe-book run

build: setup
	$(BIN)/moe-book build

book: setup
	$(BIN)/moe-book run
	$(BIN)/moe-book build
	@echo
	@echo "The book is in _build/html. Open _build/html/index.html in a browser, or serve it:"
	@echo "    python3 -m http.server -d _build/html     (then visit http://127.0.0.1:8000)"

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not browser"

$(LINT_INSTALLED): $(INSTALLED)
	$(PIP) install -q -c constraints.txt -e '.[lint]'
	touch $@

# Every step runs, so one report shows all findings; the target fails if any step failed.
lint: $(LINT_INSTALLED)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/pyright --project pyproject.toml --pythonpath $(BIN)/python || status=1; \
	$(BIN)/nbstripout --keep-id --verify $(NOTEBOOKS) || { echo "notebooks must be stored without outputs: run $(BIN)/nbstripout --keep-id on them" >&2; status=1; }; \
	$(MAKE) --no-print-directory lint-workflows || status=1; \
	exit $$status

# The workflows in .github/workflows/ are validated against GitHub's workflow schema, which
# check-jsonschema carries (the `lint` extra; no network needed), so a broken workflow fails here.
# actionlint adds its deeper checks where it is on PATH; its PyPI package downloads the binary from
# GitHub while it installs, so it is not required.
lint-workflows: $(LINT_INSTALLED)
	@$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	@al=$$(command -v $(BIN)/actionlint || command -v actionlint || true); \
	if [ -n "$$al" ]; then $$al .github/workflows/*.yml && echo "actionlint: workflows OK"; \
	else echo "actionlint is not on PATH: the workflows were checked against the schema only"; fi

# The package as users install it: the wheel in a fresh virtual environment, init, run, build.
test-wheel: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dist]'
	$(BIN)/python -m pytest -m wheel tests/test_wheel.py

# pyright (basic) on the package ([tool.pyright] in pyproject.toml), as `make lint` runs it.
typecheck: $(LINT_INSTALLED)
	$(BIN)/pyright --project pyproject.toml --pythonpath $(BIN)/python

wheel: setup
	$(PIP) install -q -c constraints.txt -e '.[dist]'
	$(BIN)/python -m build --wheel --no-isolation --outdir dist .

# Every family, every per-model notebook (about an hour on two cores), then the checks on all of
# them; writes book/coverage.json and book/coverage.md.
test-families: setup
	OMP_NUM_THREADS=1 $(BIN)/moe-book coverage --notebooks --workers 2
	MOE_BOOK_ALL_FAMILIES=1 $(BIN)/python -m pytest tests/test_coverage.py

# After `make book`: the intro and a per-model page in headless Chromium, for a reviewer.
screenshots: $(INSTALLED)
	$(BIN)/python scripts/screenshots.py --out screenshots

$(LAB_INSTALLED): $(INSTALLED)
	$(PIP) install -q -c constraints.txt -e '.[lab]'
	touch $@

lab: $(LAB_INSTALLED)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf _build book/runs book/generated $(VEGA_BUNDLE) book/_extra/vendor .pytest_cache build dist

distclean: clean
	rm -rf $(VENV) node_modules
