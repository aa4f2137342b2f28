# Two commands do all the set-up on a fresh machine:
#   make train            train the example model (ARGS="--trainer.max_epochs=5" passes options to train.py)
#   make test             run the whole test suite (offline; starts and stops a local Slurm when it can)
# Both first create the Python environment from requirements.lock (every package at an exact version), once: it
# lives outside the clone, named by a hash of the lock, so fresh clones (and CI) reuse it and a new lock builds a
# new one. uv installs it when it can be had (on PATH, or bootstrapped once into a small tool environment in the
# cache directory), pip otherwise, from the same lock; one line says which.
#   make lock             re-resolve requirements.txt + requirements-dev.txt into requirements.lock (after changing
#                         a pin; LOCK_OPTIONS=--upgrade takes the newest release of everything the pins allow)
# In a project made with `copier copy` (README.md, "Start a new project"):
#   make update           merge the template's latest version (VERSION=v1.2.0: that one) into this project, your
#                         answers reused (UPDATE_OPTIONS="--data key=value" changes one), conflicts inline, listed
# Also: make check (your model through the template's contracts, ~1 min), make lint, make bench, make gpu-check (on a GPU node), make env (only the environment), make clean-env.
# Variables: VENV=path (its place), PYTHON=python3.11, BOOTSTRAP_UV=0 (never install uv: pip unless uv is on PATH),
# MLMODELDEV_HOME=dir (environments and uv's and pip's caches there, not in ~/.cache: docs/clusters.md, "Where things go"),
# TORCH=system (keep the torch that PYTHON already imports, for POWER9: docs/environment.md), TORCH_CUDA=cu126
# (the lock's torch in that CUDA build, from the PyTorch index: V100s, drivers older than CUDA 13; docs/gpus.md).

SHELL := /bin/bash
PYTHON ?= python3
REQUIREMENTS := requirements.txt requirements-dev.txt
LOCK ?= requirements.lock
# The lock is resolved for these (PyPI has torch wheels for both); `make lock` checks every package has a wheel.
LOCK_PLATFORMS := x86_64-manylinux_2_28 aarch64-manylinux_2_28
LOCK_PYTHON := 3.11
LOCK_OPTIONS ?=
UV_VERSION := 0.13.9
BOOTSTRAP_UV ?= 1
TORCH ?= lock
# Empty: the lock's torch as PyPI serves it (CUDA 13.0). cu126 (or cu130, cu132, ..., cpu): the same version in that
# build, with the CUDA libraries it needs, from $(TORCH_INDEX)/$(TORCH_CUDA); its environment is named for it.
TORCH_CUDA ?=
TORCH_INDEX ?= https://download.pytorch.org/whl
# Environments hold compiled code: one per CPU architecture (Bede's ppc64le and aarch64 nodes share one home and
# /nobackup), in $(MLMODELDEV_HOME)/<arch>/, where job scripts look for the one of the node they run on
# (support/clusters/environments.py). MLMODELDEV_ARCH overrides `uname -m` (tests).
MLMODELDEV_HOME ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mlmodeldev
MLMODELDEV_ARCH ?= $(shell uname -m)
CACHE_DIR := $(MLMODELDEV_HOME)/$(MLMODELDEV_ARCH)
UV_TOOL := $(CACHE_DIR)/uv-$(UV_VERSION)
ENV_HASH := $(shell cat $(LOCK) | sha256sum | cut -c1-12)
VENV ?= $(CACHE_DIR)/venv-$(ENV_HASH)$(if $(filter system,$(TORCH)),-system-torch)$(if $(TORCH_CUDA),-torch-$(TORCH_CUDA))
# Given MLMODELDEV_HOME, uv's and pip's download caches go there too (~/.cache otherwise: HEC's home holds 10 GB,
# Bede's 20 GB, torch's wheels 5.6 GB).
ifneq ($(origin MLMODELDEV_HOME),file)
export UV_CACHE_DIR ?= $(MLMODELDEV_HOME)/cache/uv
export PIP_CACHE_DIR ?= $(MLMODELDEV_HOME)/cache/pip
endif
# make splits file names at whitespace: MLMODELDEV_HOME="/data/my space" failed with a cryptic flock error and left a
# stray space/ folder in the clone. Refused at once, before any recipe runs.
ifneq ($(words $(VENV)),1)
$(error the environment's path "$(VENV)" holds whitespace, which make cannot handle in file names: give MLMODELDEV_HOME (or VENV) a path without it; a symlink to the folder works)
endif
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test check lint bench gpu-check env lock lock-is-current clean-env venv-path update

env: lock-is-current $(VENV)/.complete

# Sets $uv to a uv binary and $uv_found to where it came from, or leaves $uv empty (then pip installs). The tool
# folder (63 MB, shared by every clone and lock) is written under a lock and marked complete last, so concurrent or
# interrupted bootstraps never leave a half-installed uv that a later run would trust.
define FIND_UV
uv=$$(command -v uv || true); uv_found="on PATH"
if [ -z "$$uv" ] && [ "$(BOOTSTRAP_UV)" = 1 ]; then
  mkdir -p $(CACHE_DIR)
  {
    flock 9
    if [ ! -f $(UV_TOOL)/.complete ]; then
      echo "Installing uv $(UV_VERSION) into $(UV_TOOL) (once per machine, about 6 s)"
      rm -rf $(UV_TOOL)
      PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --target $(UV_TOOL) uv==$(UV_VERSION) &&
        touch $(UV_TOOL)/.complete || echo "warning: could not install uv (above)"
    fi
  } 9> $(UV_TOOL).lock
  if [ -f $(UV_TOOL)/.complete ]; then uv=$(UV_TOOL)/bin/uv; uv_found="installed in $(UV_TOOL)"; fi
fi
endef

# uv reads neither pip.conf nor PIP_* variables. Handing it pip's package sources and constraints makes both
# installers take the same files: on a machine whose pip is given local wheels (torch's 5.6 GB among them) uv
# takes those too instead of downloading them. pip looks in all its sources for a version; so does uv with
# unsafe-best-match (its default would stop at the first index that knows the package's name).
define PIP_SOURCES_FOR_UV
pip_sources_for_uv() {
  local settings; settings=$$($(PYTHON) -m pip config list 2>/dev/null || true)
  echo --index-strategy=unsafe-best-match
  sed -nE "s/^[^.]*\.(index-url|extra-index-url|find-links|constraint)='(.*)'$$/\1 \2/p" <<< "$$settings" |
    while read -r option values; do for value in $$values; do echo "--$$option=$$value"; done; done
  if grep -qE "^[^.]*\.no-index='(1|true|yes|on)'$$" <<< "$$settings"; then echo --no-index; fi
}
endef

# The marker is written last, so an interrupted install is never taken for a complete one; flock makes concurrent
# `make` calls wait for one install instead of racing on the same directory. A directory that is neither complete
# nor one of our interrupted installs (a conda env, say) is never deleted.
define INSTALL_ENV
set -euo pipefail
if [ -f $(VENV)/.complete ]; then exit 0; fi
if [ -e $(VENV) ] && [ ! -f $(VENV)/.installing ]; then
  echo "error: $(VENV) exists but is not a complete environment: remove it, or touch $(VENV)/.complete to use it as it is" >&2
  exit 1
fi
$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" ||
  { echo "error: $(PYTHON) is older than 3.11 (the lock needs 3.11 or newer); run: make PYTHON=python3.11 ..." >&2; exit 1; }
lock=$(LOCK); venv_options=; install_options=
if [ "$(TORCH)" = system ]; then
  # POWER9: no PyPI wheels of torch (nor of the CUDA libraries it pulls in), so the environment sees the torch
  # of PYTHON (a cluster module or conda env) and installs the rest of the lock, no dependency resolution.
  $(PYTHON) -c "import torch" 2>/dev/null ||
    { echo "error: TORCH=system but $(PYTHON) cannot import torch: load the cluster's PyTorch first, or pass PYTHON=" >&2; exit 1; }
  venv_options=--system-site-packages; install_options=--no-deps
fi
torch_pins=
if [ -n "$(TORCH_CUDA)" ]; then
  # The lock's torch and torchvision in another CUDA build (+cu126): the rest of the lock without torch's CUDA
  # libraries (those of CUDA 13), then these two from the PyTorch index with the libraries of their own CUDA.
  [[ "$(TORCH_CUDA)" =~ ^(cu[0-9]+|cpu)$$ ]] && [ "$(TORCH)" != system ] ||
    { echo "error: TORCH_CUDA=$(TORCH_CUDA): give a build of torch (cu126, cu130, cpu: docs/gpus.md), without TORCH=system" >&2; exit 1; }
  torch_pins=$$(sed -nE 's/^(torch|torchvision)==([^ ;+]+).*/\1==\2+$(TORCH_CUDA)/p' $(LOCK) | paste -sd ' ')
  install_options=--no-deps
fi
$(FIND_UV)
$(PIP_SOURCES_FOR_UV)
# uv installs the lock's pip itself: a venv without pip takes 0.2 s to create, with pip 3-6 s on 2 cores.
if [ -n "$$uv" ] && [ "$(TORCH)" != system ]; then venv_options=--without-pip; fi
rm -rf $(VENV); $(PYTHON) -m venv $$venv_options $(VENV); touch $(VENV)/.installing
if [ "$(TORCH)" = system ] || [ -n "$(TORCH_CUDA)" ]; then
  lock=$(VENV)/lock-without-torch.txt
  grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' $(LOCK) > $$lock
fi
if [ "$(TORCH)" = system ]; then touch $(VENV)/.torch-from-system; fi
torch_index=$(TORCH_INDEX)/$(TORCH_CUDA)
if [ -n "$$uv" ]; then
  echo "Installing $(LOCK) into $(VENV) with uv ($$uv_found; first time only, about 1 minute)"
  # --compile-bytecode, as pip does by default: without .pyc files (and with PYTHONDONTWRITEBYTECODE=1, as on the
  # development machine and its CI) every process compiles torch anew: 22 s to import torch, Lightning and wandb
  # instead of 9 s, measured on 2 cores.
  "$$uv" pip install --quiet --python $(PY) --compile-bytecode $$(pip_sources_for_uv) $$install_options -r $$lock
  if [ -n "$$torch_pins" ]; then
    echo "Installing $$torch_pins from $$torch_index with uv (TORCH_CUDA=$(TORCH_CUDA))"
    "$$uv" pip install --quiet --python $(PY) --compile-bytecode $$(pip_sources_for_uv) --extra-index-url=$$torch_index $$torch_pins
  fi
else
  if [ "$(BOOTSTRAP_UV)" = 1 ]; then why="uv could not be installed"; else why="uv is not on PATH and BOOTSTRAP_UV=0"; fi
  echo "Installing $(LOCK) into $(VENV) with pip ($$why; first time only, about 2.5 minutes)"
  $(PY) -m pip install --quiet --disable-pip-version-check $$install_options -r $$lock
  if [ -n "$$torch_pins" ]; then
    echo "Installing $$torch_pins from $$torch_index with pip (TORCH_CUDA=$(TORCH_CUDA))"
    $(PY) -m pip install --quiet --disable-pip-version-check --extra-index-url $$torch_index $$torch_pins
  fi
fi
if [ -n "$(TORCH_CUDA)" ]; then echo $(TORCH_CUDA) > $(VENV)/.torch-cuda; fi
rm $(VENV)/.installing; touch $(VENV)/.complete
endef
export INSTALL_ENV

$(VENV)/.complete: $(LOCK)
	@mkdir -p $(dir $(VENV))
	@flock $(VENV).lock bash -c "$$INSTALL_ENV"

# A pin changed in requirements*.txt but not yet locked would otherwise be ignored without a word.
lock-is-current:
	@for requirements in $(REQUIREMENTS); do \
	  for pin in $$(sed -E 's/#.*//; s/\[[^]]*\]//; s/[[:space:]]//g' $$requirements | grep '=='); do \
	    name=$$(tr 'A-Z_.' 'a-z--' <<< "$${pin%%==*}"); version=$${pin#*==}; \
	    cut -d' ' -f1 $(LOCK) | grep -qxF "$$name==$$version" || \
	      { echo "error: $$requirements pins $$pin but $(LOCK) does not: run make lock" >&2; exit 1; }; \
	  done; \
	done

# uv prefers the versions already in the lock, so changing one pin moves only what depends on it.
define LOCK_ENV
set -euo pipefail
$(FIND_UV)
[ -n "$$uv" ] || { echo "error: make lock needs uv: put it on PATH, or leave BOOTSTRAP_UV=1 to install it" >&2; exit 1; }
"$$uv" pip compile --quiet --universal --python-version $(LOCK_PYTHON) --custom-compile-command "make lock" \
  $(LOCK_OPTIONS) -o $(LOCK) $(REQUIREMENTS)
dry_run_target=$$(mktemp -d); trap 'rm -rf "$$dry_run_target"' EXIT
for platform in $(LOCK_PLATFORMS); do
  "$$uv" pip install --quiet --dry-run --only-binary :all: --no-deps --python-platform $$platform \
    --python-version $(LOCK_PYTHON) --target $$dry_run_target -r $(LOCK) ||
    { echo "error: $(LOCK) lacks a wheel for $$platform (above): pin another version in requirements.txt" >&2; exit 1; }
done
echo "$(LOCK): $$(grep -c '^[a-z]' $(LOCK)) pinned versions, wheels for $(LOCK_PLATFORMS); commit it with requirements*.txt"
endef
export LOCK_ENV

lock:
	@bash -c "$$LOCK_ENV"

# Where the environment is (for `source "$(make -s venv-path)/bin/activate"`).
venv-path:
	@echo $(VENV)

train: env
	$(PY) train.py $(ARGS)

# The SLURM tests need a real Slurm: with_local_slurm.sh starts a one-node cluster on localhost when it can
# (root, apt), runs the tests, stops it again and passes on pytest's exit code.
# The fast tier by default: every test but those marked slow (8 s or more each: Slurm jobs, DDP, whole training
# runs). CI=true (what .ci/run sets) or TIER=all runs every test.
TIER ?= $(if $(filter true 1 yes,$(CI)),all,fast)
test: env
	WANDB_MODE=offline tests/slurm/with_local_slurm.sh $(PY) -m pytest $(if $(filter fast,$(TIER)),-m "not slow") \
		$(PYTEST_ARGS)

# Your model and data through the template's contracts (check.py), on the CPU, in about a minute.
check: env
	$(PY) check.py $(ARGS)

# Which template version `make update` takes, said once and given to Copier as --vcs-ref: VERSION's (checked first,
# for a template in a directory: a tag, branch or commit it has), else the newest version tag, else (a clone, fork or
# download without tags) its latest commit. Copier alone printed "No git tags found" twice, and a VERSION the
# template lacks was a 69-line traceback. Sets $ref (empty: Copier's own choice, for a template given by URL).
define TEMPLATE_REF
ref=
if [ -d "$$source" ] && git -C "$$source" rev-parse -q --verify HEAD > /dev/null 2>&1; then
  versions=$$(git -C "$$source" tag -l 'v[0-9]*' --sort=-v:refname)
  # Copier rebuilds the project's own version to see what the researcher changed: it must be in the template too.
  git -C "$$source" rev-parse -q --verify "$$before^{commit}" > /dev/null ||
    { echo "error: this project's template version $$before (_commit in $$answers) is not in the template" \
        "($$source): a clone without its tags or history? git fetch --tags there, then make update" >&2; exit 1; }
  if [ -n "$$VERSION" ]; then
    git -C "$$source" rev-parse -q --verify "$$VERSION^{commit}" > /dev/null ||
      { echo "error: VERSION=$$VERSION is no tag, branch or commit of the template ($$source), whose versions are" \
          "$$(echo $$versions | grep . || echo 'none: it has no tags (git fetch --tags there)'): give one of them," \
          "or leave VERSION out for the newest" >&2; exit 1; }
    ref=$$VERSION
    echo "Taking the template's $$ref ($$(git -C "$$source" rev-parse --short "$$ref^{commit}"))."
  elif [ -n "$$versions" ]; then
    ref=$$(head -n 1 <<< "$$versions")
    echo "Taking the template's newest version, $$ref."
  else
    ref=HEAD
    echo "Taking the template's latest commit, $$(git -C "$$source" rev-parse --short HEAD): it has no version tags" \
      "(a clone without them: git fetch --tags in $$source brings them)."
  fi
fi
endef

# Copier's own update (a three-way merge: your changes re-applied onto the new version), with the answers recorded in
# .copier-answers.yml (--defaults) and conflicts written into the files (--conflict inline) rather than left aside
# in .rej files; then every file with conflict markers or a .rej file is listed. Copier refuses a dirty tree too,
# but in a paragraph: this says it in one line, before anything is fetched.
define UPDATE_PROJECT
set -euo pipefail
answers=.copier-answers.yml
[ -f $$answers ] ||
  { echo "error: no $$answers here: make update works in a project made by copier copy (README.md, Start a new project)" >&2; exit 1; }
[ -z "$$(git status --porcelain 2>/dev/null || echo not-a-repository)" ] ||
  { echo "error: uncommitted changes or not a git repository (git status): commit or stash them, then make update" >&2; exit 1; }
# Copier records a local template's path as it was given: a relative one only works from where `copier copy` ran.
source=$$(sed -nE 's/^_src_path: *//p' $$answers)
[[ "$$source" =~ ^([a-z+]+://|git@|gh:|gl:) ]] || [ -d "$$source" ] ||
  { echo "error: the template ($$source, _src_path in $$answers) is not a directory from here: write its git URL or absolute path there, commit, then make update" >&2; exit 1; }
version() { sed -nE 's/^_commit: *//p' $$answers; }
before=$$(version)
$(TEMPLATE_REF)
# Copier's own failures (an option it does not know, an answer its validator refuses) are a usage text or a
# traceback of 40-70 lines: its own last word, in one line.
copier_output=$$(mktemp); trap 'rm -f "$$copier_output"' EXIT
if ! $(PY) -m copier update --quiet --defaults --conflict inline $${ref:+--vcs-ref "$$ref"} $(UPDATE_OPTIONS) \
    > "$$copier_output" 2>&1; then
  reason=$$(grep -E '^([A-Za-z_.]*Error|Error): ' "$$copier_output" | tail -n 1 | sed -E 's/^[A-Za-z_.]*Error: //')
  changed=$$([ -z "$$(git status --porcelain)" ] && echo "nothing was changed" ||
    echo "git checkout -- . && git clean -fd undoes what it changed")
  echo "error: copier update refused: $${reason:-$$(tail -n 1 "$$copier_output")}; $$changed" >&2
  exit 1
fi
cat "$$copier_output"  # its warnings, if any
after=$$(version)
conflicts=$$(git ls-files -co --exclude-standard | while read -r f; do
  case $$f in *.rej) echo $$f;; *) grep -qE '^(<<<<<<<|>>>>>>>) ' $$f 2>/dev/null && echo $$f || true;; esac; done | sort -u)
if [ -z "$$(git status --porcelain)" ]; then echo "Already at the template version $$after: nothing to update."; exit 0; fi
if [ "$$before" = "$$after" ]; then echo "At the template version $$after, with the answers changed."
else echo "Updated from the template version $$before to $$after (CHANGELOG.md says what changed)."; fi
if [ -n "$$conflicts" ]; then
  echo "Conflicts, where the template changed lines that you changed too: $$(echo $$conflicts)"
  echo "In each file, keep what you want of the lines between '<<<<<<< before updating' (yours), '=======' and"
  echo "'>>>>>>> after updating' (the template's), delete those marker lines (apply a .rej file's lines by hand, then"
  echo "delete it), and: git add -A && git commit -m 'Template $$after'"
else
  echo "No conflicts: review with git diff, then: git add -A && git commit -m 'Template $$after'"
fi
endef
export UPDATE_PROJECT

update: env
	@VERSION='$(subst ','\'',$(VERSION))' bash -c "$$UPDATE_PROJECT"

lint: env
	$(PY) -m ruff check .

# The checks only GPUs exercise (benchmarks/gpu_check.py), one table; exit status 3 where there is no GPU.
gpu-check: env
	$(PY) benchmarks/gpu_check.py $(ARGS)

bench: env
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/cka_validation.py
	$(PY) benchmarks/launch.py
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/grid_check.py

clean-env:
	rm -rf '$(VENV)' '$(VENV).lock'
