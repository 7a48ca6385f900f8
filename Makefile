# `make test` and `make demo` work on a fresh machine: they create .venv and install the package.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: venv test test-fast demo demo-seeds
venv: $(VENV)/.installed

# The paper's comparison at CPU scale: base model, 3 RL variants, pass@k, report (runs/demo).
demo: $(VENV)/.installed
	$(PY) -m explore_jax.demo --config configs/demo.py --workdir runs/demo

# The same comparison over 3 seeds; means and 95% intervals.
demo-seeds: $(VENV)/.installed
	$(PY) -m explore_jax.demo --config configs/demo.py:seeds=3 --workdir runs/demo_seeds \
	    --config.base_model_dir=runs/demo/base_model

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m "not slow" tests
