# Pipeline step 40, the two reference runs (upstream engine, Docker image) and result comparison.
# Included by the Makefile; uses its IN, OUT, FLAGS, THREADS, $(PY) and $(STAMP). Paths may contain
# spaces (quote them: make reference IN="my scans/t1.nii.gz"). Docs: docs/pipeline.md.

BASELINE ?= reference
A ?=
B ?=
POST_A ?=
POST_B ?=
VOL_A ?=
VOL_B ?=
REPORT ?=
DIFF_FLAGS ?=

# Knobs handed to the stage scripts; empty ones leave .env's values in force.
STAGE_ENV = SYNTHSEG_NATIVE="$(CURDIR)" PYTHON="$(PY)" SYNTHSEG_FLAGS="$(FLAGS)" THREADS="$(THREADS)" BACKEND="$(BACKEND)"
# $(call need,usage) fails the recipe with a usage line when IN is empty.
need = test -n "$(IN)" || { echo "[ERR] usage: make $@ IN=image $(1)" >&2; exit 2; }

.PHONY: synthseg reference baseline diff compare

synthseg: $(STAMP) ## Pipeline step 40 on .env's SID, or on IN=image [OUT=seg|folder] [FLAGS=...] (cached)
	@$(STAGE_ENV) bash scripts/40_synthseg_native.sh $(if $(IN),"$(IN)" $(if $(OUT),"$(OUT)"))

reference: $(STAMP) ## Upstream SynthSeg (needs SYNTHSEG_HOME) on IN=image [OUT=...] [FLAGS=...], in results/reference/
	@$(call need,[OUT=seg|folder] [FLAGS=...])
	@ENGINE=upstream $(STAGE_ENV) bash scripts/40_synthseg_native.sh "$(IN)" "$(or $(OUT),results/reference/)"

baseline: ## Docker pwesp/synthseg:py38 on IN=image [OUT=...] [FLAGS=...], in results/baseline/
	@$(call need,[OUT=seg|folder] [FLAGS=...] [DOCKER_IMAGE=...])
	@SYNTHSEG_FLAGS="$(FLAGS)" THREADS="$(THREADS)" bash scripts/40_synthseg_docker.sh "$(IN)" \
		"$(or $(OUT),results/baseline/)"

diff: $(STAMP) ## Compare A=seg|folder B=seg|folder [POST_A= POST_B= VOL_A= VOL_B= REPORT= DIFF_FLAGS=]
	@test -n "$(A)" -a -n "$(B)" || { echo "[ERR] usage: make diff A=seg B=seg [POST_A=.. POST_B=..] \
		[VOL_A=.. VOL_B=..] [REPORT=file.md] [DIFF_FLAGS='--min-dice 0.99']" >&2; exit 2; }
	@$(PY) -m synthseg_native.tools.compare "$(A)" "$(B)" $(if $(POST_A),--post-a "$(POST_A)") \
		$(if $(POST_B),--post-b "$(POST_B)") $(if $(VOL_A),--vol-a "$(VOL_A)") $(if $(VOL_B),--vol-b "$(VOL_B)") \
		$(if $(REPORT),--report "$(REPORT)") $(DIFF_FLAGS)

compare: $(STAMP) ## Native vs BASELINE=reference|docker on IN=image, posteriors too; in results/compare/<name>/
	@$(call need,[BASELINE=reference|docker] [FLAGS=...] [DIFF_FLAGS=...])
	@case "$(BASELINE)" in reference|docker) ;; \
		*) echo "[ERR] BASELINE must be reference or docker, not '$(BASELINE)'" >&2; exit 2 ;; esac
	@name="$$(basename -- "$(IN)")"; name="$${name%.gz}"; name="$${name%.nii}"; name="$${name%.mgz}"; \
	dir="results/compare/$$name"; \
	POSTERIORS=1 $(STAGE_ENV) bash scripts/40_synthseg_native.sh "$(IN)" "$$dir/native/"; \
	if [ "$(BASELINE)" = docker ]; then \
		POSTERIORS=1 SYNTHSEG_FLAGS="$(FLAGS)" THREADS="$(THREADS)" bash scripts/40_synthseg_docker.sh "$(IN)" "$$dir/docker/"; \
	else \
		POSTERIORS=1 ENGINE=upstream $(STAGE_ENV) bash scripts/40_synthseg_native.sh "$(IN)" "$$dir/reference/"; \
	fi; \
	$(PY) -m synthseg_native.tools.compare "$$dir/native" "$$dir/$(BASELINE)" --report "$$dir/diff.md" $(DIFF_FLAGS)
