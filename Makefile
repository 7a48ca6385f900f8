# `make test` and `make demo` work on a fresh machine: they create .venv and install the locked
# versions of requirements/cpu.txt (pip-tools; refresh with `make lock`), then the package itself.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.txt
TPU_LOCK := requirements/tpu.txt

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The TPU compiler (libtpu of the TPU lock) beside the venv, not in it, so that CPU runs never
# load it: `explore_jax.aot` and its test put it on PYTHONPATH (with JAX_PLATFORMS=cpu).
TPU_COMPILER := $(VENV)/tpu-compiler
$(TPU_COMPILER)/.installed: $(VENV)/.installed $(TPU_LOCK)
	$(PY) -m pip install -q --no-deps --target $(TPU_COMPILER) "$$(grep '^libtpu==' $(TPU_LOCK))"
	touch $@

.PHONY: venv test test-fast demo study suite demo-check lock tpu-compiler
venv: $(VENV)/.installed
tpu-compiler: $(TPU_COMPILER)/.installed

# The paper's comparison on the countdown testbed at CPU scale, one seed of two arms: base model,
# GRPO and GRPO + entropy advantage, pass@k, paired comparison, report (runs/demo).
demo: $(VENV)/.installed
	$(PY) -m explore_jax.demo --config configs/demo.py --workdir runs/demo

# The full comparison (configs/demo.py's plan=study: 5 arms x 5 seeds, 128 samples per problem);
# about an hour on 2 cores; resumes stage by stage (runs/study).
study: $(VENV)/.installed
	$(PY) -m explore_jax.demo --config configs/demo.py:plan=study --workdir runs/study

# The paper's method against the exploration suite (configs/demo.py's plan=suite: baseline,
# entropy advantage, Clip-Cov, KL-Cov, high-entropy tokens, pass@k, placebo x 5 seeds; see
# docs/exploration_suite.md for its running time); resumes stage by stage (runs/suite).
suite: $(VENV)/.installed
	$(PY) -m explore_jax.demo --config configs/demo.py:plan=suite --workdir runs/suite

# Runs the demo twice from nothing (fresh cache and workdirs) and diffs the two results.json.
demo-check: $(VENV)/.installed
	$(PY) -m explore_jax.demo.repro --workdir runs/demo_check

test: $(VENV)/.installed $(TPU_COMPILER)/.installed
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" tests

# Refresh the locks (after a change of pyproject.toml's dependencies, or to move to newer
# releases): the newest versions that satisfy pyproject.toml, the CPU lock with the test extra,
# the TPU lock with the CPU lock's JAX and the libtpu that goes with it (no torch).
lock: $(VENV)/.installed
	$(PY) -m pip install -q pip-tools
	$(VENV)/bin/pip-compile -q --upgrade --extra test --strip-extras --no-emit-index-url \
	    --no-emit-find-links -o $(LOCK) pyproject.toml
	printf '# TPU hosts: the JAX of $(LOCK) with libtpu (no torch, no test tools).\njax[tpu]==%s\n' \
	    "$$(sed -n 's/^jax==//p' $(LOCK))" > requirements/tpu.in
	$(VENV)/bin/pip-compile -q --upgrade --strip-extras --no-emit-index-url --no-emit-find-links \
	    -o $(TPU_LOCK) pyproject.toml requirements/tpu.in
