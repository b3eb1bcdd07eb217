# Native SynthSeg toolkit: the single entry point. `make help` lists the targets.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

BACKEND ?=
VENV ?= $(if $(filter torch,$(BACKEND)),.venv-torch,.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SHELL_SCRIPTS := scripts/*.sh tests/slurm/*.sh .ci/run
IN ?=
OUT ?=
FLAGS ?=
THREADS ?=

.PHONY: help setup test test-fast lint doctor clean demo run testweight-recipes _need_shellcheck

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Build .venv for this platform (GPU=cuda on Linux; BACKEND=torch: .venv-torch, no TensorFlow; FORCE=1 rebuilds; PYTHON=)
	@BACKEND="$(or $(BACKEND),tf)" VENV="$(VENV)" bash scripts/setup_tf_metal_env.sh

$(STAMP): requirements-metal.txt requirements-torch.txt pyproject.toml
	@BACKEND="$(or $(BACKEND),tf)" VENV="$(VENV)" bash scripts/setup_tf_metal_env.sh

test: _need_shellcheck $(STAMP) ## Run pytest (all of it), ruff, the import layers and shellcheck (builds the environment first if needed)
	$(PY) -m pytest -q
	@$(MAKE) --no-print-directory lint

test-fast: _need_shellcheck $(STAMP) ## The quick part of the tests (pytest -m "not slow", a few minutes), then lint
	$(PY) -m pytest -q -m "not slow"
	@$(MAKE) --no-print-directory lint

lint: _need_shellcheck $(STAMP) ## ruff, the import layers (lint-imports, pyproject.toml) and shellcheck
	$(VENV)/bin/ruff check synthseg_src tests devtools
	$(VENV)/bin/lint-imports --no-cache
	shellcheck $(SHELL_SCRIPTS)

# make test/lint fail up front, with the fix, when shellcheck is missing (CI installs it in .ci/run).
_need_shellcheck:
	@command -v shellcheck >/dev/null 2>&1 || { echo "[ERR] shellcheck not found (make test and make lint need it): \
	apt-get install shellcheck, or brew install shellcheck" >&2; exit 1; }

doctor: $(STAMP) ## Versions, devices, and where Conv3D/BatchNorm really run
	@$(PY) -m synthseg_native.tools.doctor

demo: $(STAMP) ## Segment nilearn's MNI152 T1 into results/demo/ (test weights if no official ones)
	@$(PY) -m synthseg_native.tools.demo $(if $(THREADS),--threads $(THREADS)) \
		--flags "$(FLAGS)$(if $(BACKEND), --backend $(BACKEND))"

run: $(STAMP) ## Segment IN into OUT with upstream's FLAGS, e.g. make run IN=t1.nii.gz OUT=seg.nii.gz FLAGS="--vol v.csv"
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "[ERR] usage: make run IN=input OUT=output [FLAGS='--parc --vol v.csv']" >&2; exit 2; }
	@$(PY) -m synthseg_native --i "$(IN)" --o "$(OUT)" $(if $(THREADS),--threads $(THREADS)) \
		$(if $(BACKEND),--backend $(BACKEND)) $(FLAGS)

testweight-recipes: $(STAMP) ## Development: recalibrate the test weights with TensorFlow and rewrite the recipes in the package
	@$(PY) -m devtools.weightauthor

clean: ## Remove caches and demo outputs (keeps .venv; rm -rf .venv for a full reset)
	rm -rf results/demo .pytest_cache .ruff_cache .snakemake build synthseg_src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

-include mk/*.mk
