# Benchmarks: hyperfine over the native engine, the upstream reference (SYNTHSEG_HOME) and the Docker
# baseline, and the conv3d roofline. Included by the Makefile; docs/performance.md explains the results.

RUNS ?= 5
WARMUP ?= 1
RESULTS ?=

.PHONY: bench roofline profile-layers

bench: $(STAMP) ## hyperfine native vs reference vs Docker, in rounds [IN= RUNS=5 WARMUP=1 THREADS= FLAGS= RESULTS= BACKENDS="tf torch" PRECISIONS="fp32 bf16" INTERLEAVE=0 MAX_TIME_RATIO= MAX_RSS_RATIO= MIN_AGREEMENT= REFERENCE=upstream|freesurfer]
	@$(PY) -m devtools.bench --runs "$(RUNS)" --warmup "$(WARMUP)" $(if $(IN),--in "$(IN)") \
		$(if $(BACKENDS),--backends "$(BACKENDS)") $(if $(PRECISIONS),--precisions "$(PRECISIONS)") \
		$(if $(filter 0,$(INTERLEAVE)),--no-interleave) \
		$(if $(MAX_TIME_RATIO),--max-time-ratio "$(MAX_TIME_RATIO)") \
		$(if $(MAX_RSS_RATIO),--max-rss-ratio "$(MAX_RSS_RATIO)") \
		$(if $(MIN_AGREEMENT),--min-agreement "$(MIN_AGREEMENT)") \
		$(if $(THREADS),--threads "$(THREADS)") $(if $(FLAGS),--flags "$(FLAGS)") \
		$(if $(RESULTS),--results "$(RESULTS)") $(if $(REFERENCE),--reference "$(REFERENCE)")

roofline: $(STAMP) ## Conv3D throughput of this machine, fp32 and bf16/fp16 where supported [THREADS= RESULTS=]
	@$(PY) -m devtools.roofline $(if $(THREADS),--threads "$(THREADS)") \
		--out "$(or $(RESULTS),results/$(shell date +%F)-$(shell hostname -s 2>/dev/null || hostname))/roofline.json"

profile-layers: $(STAMP) ## Time every piece of the TF network stage against bare convs of its shapes [IN= THREADS= FLAGS= RESULTS=]
	@$(PY) -m devtools.layerprofile $(if $(IN),--i "$(IN)") $(if $(THREADS),--threads "$(THREADS)") \
		$(FLAGS) --out "$(or $(RESULTS),results/$(shell date +%F)-$(shell hostname -s 2>/dev/null || hostname))/layers.json"

.PHONY: gpu-check-prepare gpu-check

gpu-check-prepare: $(STAMP) ## Prepare the GPU check here: wheels, MNI152 and CPU torch reference in build/gpu_check/ (docs/performance.md)
	@PYTHON="$(PY)" bash scripts/gpu_check.sh prepare $(if $(THREADS),--threads "$(THREADS)")

gpu-check: ## Run the prepared GPU check (on the GPU machine; DEVICE=cpu tests it here) [SCANS=5 MODES= PRECISIONS=]
	@bash scripts/gpu_check.sh run

.PHONY: mac-check

mac-check: $(STAMP) ## On a Mac: doctor, then the MNI152 on the CPU and the Apple GPU with each backend, into results/<date>-<host>/mac-check (send it back) [DEVICE= MODES= CROP= THREADS= MODELS=]
	@$(PY) -m devtools.maccheck $(if $(DEVICE),--device "$(DEVICE)") $(if $(MODES),--modes $(MODES)) \
		$(if $(CROP),--crop "$(CROP)") $(if $(THREADS),--threads "$(THREADS)") $(if $(RESULTS),--out "$(RESULTS)") $(if $(MODELS),--models "$(MODELS)")
