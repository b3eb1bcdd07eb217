# make cohort: a whole study through workflow/Snakefile, shards in parallel on local cores or on SLURM.
# Included by the Makefile; uses its IN, OUT, FLAGS, THREADS, $(PY) and $(STAMP). Docs: docs/cohorts.md.
#
# Snakemake lives in its own environment (.venv-workflow, from requirements-workflow.txt): tensorflow 2.15 pins
# wrapt < 1.15 and every Snakemake 8/9 needs wrapt >= 1.15. Each job runs .venv's engine.

WF_VENV ?= .venv-workflow
WF_STAMP := $(WF_VENV)/.setup-stamp
SNAKEMAKE := $(WF_VENV)/bin/snakemake
CORES ?= $(shell getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
SHARDS ?=
PROFILE ?=
# Local runs: the memory Snakemake may hand out, 8000 MB per shard job (a full-size scan peaks at ~8 GB,
# docs/performance.md), so more shards than fit in memory wait instead of swapping. Default: all of it.
MEM_MB ?= $(shell "$(PY)" -c 'import os; print(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)' \
	2>/dev/null)

.PHONY: cohort setup-workflow

setup-workflow: ## Build .venv-workflow (Snakemake + SLURM executor plugin) for make cohort; FORCE=1 rebuilds
	@WORKFLOW_VENV="$(WF_VENV)" bash scripts/setup_workflow_env.sh

$(WF_STAMP): requirements-workflow.txt
	@WORKFLOW_VENV="$(WF_VENV)" bash scripts/setup_workflow_env.sh

# The Snakemake test needs the workflow environment; without a Python >= 3.11 it is skipped (except in CI).
test: _workflow_env_if_possible
.PHONY: _workflow_env_if_possible
_workflow_env_if_possible:
	@$(MAKE) --no-print-directory $(WF_STAMP) || echo "[WARN] no workflow environment: the Snakemake test will skip" >&2

cohort: $(STAMP) $(WF_STAMP) ## Segment a cohort: IN=folder|list.txt|BIDS OUT=folder [CORES= SHARDS= FLAGS= PROFILE=profiles/slurm]
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "[ERR] usage: make cohort IN=scans/ OUT=segs/ [CORES=4] [SHARDS=4] \
		[THREADS=1] [FLAGS='--parc --qc segs/qc.csv'] [PROFILE=profiles/slurm]" >&2; exit 2; }
	@"$(SNAKEMAKE)" --snakefile workflow/Snakefile --forceall --rerun-incomplete --keep-going \
		$(if $(PROFILE),--profile "$(PROFILE)",--cores $(CORES) $(if $(MEM_MB),--resources mem_mb=$(MEM_MB))) \
		--config "input=$(IN)" "output=$(OUT)" "flags=$(FLAGS)" "python=$(if $(filter /%,$(PY)),$(PY),$(CURDIR)/$(PY))" \
		$(if $(SHARDS),shards=$(SHARDS)) $(if $(THREADS),threads=$(THREADS))
