#!/usr/bin/env bash
# Pipeline step 40 the old way: SynthSeg in the pwesp/synthseg:py38 Docker image, the baseline the native
# stage must reproduce before a pipeline switches to it. The same paths, .env keys and flags as
# 40_synthseg_native.sh (it is that stage with ENGINE=docker); it always runs: a baseline is made on purpose.
#
# Usage: scripts/40_synthseg_docker.sh [IN [OUT]]
# Environment: DOCKER_IMAGE (default pwesp/synthseg:py38), DOCKER_SYNTHSEG_CMD (the command inside the image,
# split like a shell; default "python /workspace/SynthSeg/scripts/commands/SynthSeg_predict.py"), DOCKER_USER
# (Linux default: your uid:gid, so outputs are yours; empty: the image's user), DEVICE=auto|cpu|gpu (gpu adds
# --gpus all), SYNTHSEG_FLAGS, THREADS, POSTERIORS=1, ENV_FILE. Docs: docs/pipeline.md.
set -euo pipefail

ENGINE=docker exec bash "$(dirname "${BASH_SOURCE[0]}")/40_synthseg_native.sh" "$@"
