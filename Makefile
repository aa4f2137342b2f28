# Two commands do all the set-up on a fresh machine:
#   make train            train the example model (ARGS="--trainer.max_epochs=5" passes options to train.py)
#   make test             run the whole test suite (offline; starts and stops a local Slurm when it can)
# Both first create the Python environment from the pinned requirements, once: it lives outside the clone,
# named by a hash of the requirements, so fresh clones (and CI) reuse it and a changed pin builds a new one.
# Also: make lint, make bench, make env (only the environment), make clean-env. VENV=path overrides its place.

SHELL := /bin/bash
PYTHON ?= python3
REQUIREMENTS := requirements.txt requirements-dev.txt
ENV_HASH := $(shell cat $(REQUIREMENTS) | sha256sum | cut -c1-12)
VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mlmodeldev/venv-$(ENV_HASH)
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test lint bench env clean-env

env: $(VENV)/.complete

# The marker is written last, so an interrupted install is never taken for a complete one; flock makes
# concurrent `make` calls wait for one install instead of racing on the same directory. A directory that is
# neither complete nor one of our interrupted installs (a conda env, say) is never deleted.
$(VENV)/.complete: $(REQUIREMENTS)
	@mkdir -p $(dir $(VENV))
	@flock $(VENV).lock bash -c 'set -euo pipefail; \
	  if [ -f $(VENV)/.complete ]; then exit 0; fi; \
	  if [ -e $(VENV) ] && [ ! -f $(VENV)/.installing ]; then \
	    echo "error: $(VENV) exists but is not a complete environment: remove it, or touch $(VENV)/.complete to use it as it is" >&2; exit 1; fi; \
	  $(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 10))" || \
	    { echo "error: $(PYTHON) is older than 3.10; run: make PYTHON=python3.11 ..." >&2; exit 1; }; \
	  echo "Creating the environment in $(VENV) (first time only, about 3 minutes)"; \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); touch $(VENV)/.installing; \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt; \
	  rm $(VENV)/.installing; touch $(VENV)/.complete'

train: env
	$(PY) train.py $(ARGS)

# The SLURM tests need a real Slurm: with_local_slurm.sh starts a one-node cluster on localhost when it can
# (root, apt), runs the tests, stops it again and passes on pytest's exit code.
test: env
	WANDB_MODE=offline tests/slurm/with_local_slurm.sh $(PY) -m pytest $(PYTEST_ARGS)

lint: env
	$(PY) -m ruff check .

bench: env
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/cka_validation.py
	$(PY) benchmarks/launch.py

clean-env:
	rm -rf $(VENV) $(VENV).lock
