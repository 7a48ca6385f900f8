# `make test` and `make demo` work on a fresh machine: they create .venv and install the package.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: venv test test-fast
venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m "not slow" tests
