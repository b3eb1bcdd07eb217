#!/usr/bin/env bash
# Pipeline step 40 the old way: SynthSeg in the pwesp/synthseg:py38 Docker image. It is the baseline
# the native stage must reproduce before the pipeline switches to it.
#
# Usage: scripts/40_synthseg_docker.sh [IN [OUT]]   (same modes, names and .env keys as
#        40_synthseg_native.sh; it always runs: a baseline is made on purpose)
#
# Environment: DOCKER_IMAGE (default pwesp/synthseg:py38), DOCKER_SYNTHSEG_CMD (the command inside
# the image, word-split; default "python /workspace/SynthSeg/scripts/commands/SynthSeg_predict.py"),
# DOCKER_USER (Linux default: your uid:gid, so outputs are yours; empty: the image's user),
# SYNTHSEG_FLAGS, THREADS, DEVICE=auto|cpu|gpu (gpu adds --gpus all), POSTERIORS=1, ENV_FILE.
#
# Assumption, not verified here (no Docker daemon or registry access when this was written): the
# image holds upstream SynthSeg at /workspace/SynthSeg with its weights, and its entrypoint runs the
# command it is given (public pipelines run it as `docker run ... pwesp/synthseg:py38 python
# /workspace/SynthSeg/scripts/commands/SynthSeg_predict.py --i ... --o ...`). If your image differs,
# set DOCKER_SYNTHSEG_CMD. Docs: docs/pipeline.md.
set -euo pipefail

# shellcheck source=scripts/40_synthseg_native.sh
source "$(dirname "${BASH_SOURCE[0]}")/40_synthseg_native.sh"  # its path and .env rules, not its main

readonly DEFAULT_IMAGE="pwesp/synthseg:py38"
readonly DEFAULT_CMD="python /workspace/SynthSeg/scripts/commands/SynthSeg_predict.py"

#######################################
# Prints a --mount value for a bind mount. Docker parses the value as CSV, so a source path with a
# comma or a double quote is quoted CSV-style; spaces and other characters need nothing.
# Arguments: source folder, target path, extra options (e.g. ",readonly")
#######################################
docker40::bind() {
  local source="source=$1"
  if [[ "${source}" == *[,\"]* ]]; then
    source="\"${source//\"/\"\"}\""
  fi
  printf 'type=bind,%s,target=%s%s' "${source}" "$2" "${3:-}"
}

main() {
  (($# <= 2)) || die "usage: $0 [IN [OUT]]  (see docs/pipeline.md)"
  stage40::resolve_paths "$@"
  local device="${DEVICE:-auto}" image="${DOCKER_IMAGE:-${DEFAULT_IMAGE}}"
  [[ "${device}" =~ ^(auto|cpu|gpu)$ ]] || die "DEVICE must be auto, cpu or gpu, not '${device}'"
  local -a run=(run --rm) cmd flags=()
  read -r -a cmd <<< "${DOCKER_SYNTHSEG_CMD:-${DEFAULT_CMD}}"
  read -r -a flags <<< "${SYNTHSEG_FLAGS:-}"
  log_info "input:   ${STAGE40_IN}"
  log_info "outputs: ${STAGE40_SEG}, ${STAGE40_VOL}${STAGE40_POST:+, ${STAGE40_POST}}"
  log_info "engine:  docker ${image}, device: ${device}${flags[*]:+, flags: ${flags[*]}}"
  [[ -f "${STAGE40_IN}" ]] || die "input not found: ${STAGE40_IN} (run step 30 first, or pass an image)"
  command -v docker > /dev/null 2>&1 \
    || die "docker not found: install Docker (or use scripts/40_synthseg_native.sh)"
  docker info > /dev/null 2>&1 \
    || die "the Docker daemon is not reachable ('docker info' failed): start Docker Desktop or dockerd"

  local in_dir out_dir
  in_dir="$(cd -- "$(dirname -- "${STAGE40_IN}")" && pwd)"
  mkdir -p -- "$(dirname -- "${STAGE40_SEG}")"
  out_dir="$(cd -- "$(dirname -- "${STAGE40_SEG}")" && pwd)"

  local user="${DOCKER_USER-$(id -u):$(id -g)}"
  if [[ "$(uname -s)" == Darwin ]]; then
    user="${DOCKER_USER:-}"  # Docker Desktop already maps file ownership to you
    [[ "$(uname -m)" != arm64 ]] || run+=(--platform linux/amd64)  # amd64 image, emulated on Apple silicon
  fi
  [[ -z "${user}" ]] || run+=(--user "${user}")
  [[ "${device}" != gpu ]] || run+=(--gpus all)
  run+=(--mount "$(docker40::bind "${in_dir}" /in ,readonly)" --mount "$(docker40::bind "${out_dir}" /out)")
  run+=("${image}" "${cmd[@]}" --i "/in/$(basename -- "${STAGE40_IN}")"
    --o "/out/$(basename -- "${STAGE40_SEG}")" --vol "/out/$(basename -- "${STAGE40_VOL}")")
  run+=(${flags[@]+"${flags[@]}"})
  [[ -z "${STAGE40_POST}" ]] || run+=(--post "/out/$(basename -- "${STAGE40_POST}")")
  [[ -z "${THREADS:-}" ]] || run+=(--threads "${THREADS}")
  [[ "${device}" != cpu ]] || run+=(--cpu)

  log_run "SynthSeg step 40 (Docker baseline): ${STAGE40_IN}"
  local start="${SECONDS}"
  docker "${run[@]}" || die "SynthSeg in Docker failed (exit $?) on ${STAGE40_IN}"
  log_done "${STAGE40_SEG} and ${STAGE40_VOL} in $((SECONDS - start)) s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
