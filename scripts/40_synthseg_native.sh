#!/usr/bin/env bash
# Pipeline step 40: SynthSeg with the native engine (ENGINE=upstream: the reference engine).
#
# Usage: scripts/40_synthseg_native.sh [IN [OUT]]
#   no arguments  pipeline mode, from .env (DATA_ROOT, SID):
#                   IN  = $DATA_ROOT/derivatives/$SID/synthsr/${SID}_synthsr.nii.gz
#                   OUT = $DATA_ROOT/derivatives/$SID/synthseg/${SID}_synthseg.nii.gz
#   IN            OUT = <folder of IN>/<name of IN>_synthseg.nii.gz
#   IN OUT        OUT is the segmentation file; an OUT without .nii/.nii.gz/.mgz is a folder that
#                 receives <name of IN>_synthseg.nii.gz
#   The volumes CSV is <OUT without extension>_vols.csv, beside OUT.
#
# Environment (variables win over .env): FORCE=1 (re-run even if cached), THREADS, SYNTHSEG_FLAGS
# (extra engine flags, word-split: "--parc --robust"), SYNTHSEG_MODELS (weights folder),
# DEVICE=auto|cpu|gpu|cuda|mps, BACKEND=tf|torch|auto (native engine), ENGINE=native|upstream, SYNTHSEG_HOME (upstream checkout), POSTERIORS=1
# (also write <OUT without extension>_posteriors.nii.gz), PYTHON (default: the project's .venv, or $VENV),
# ENV_FILE (default: .env at the project root).
#
# The cache lives in Python (synthseg_native.batch.provenance): a run is skipped only when the outputs and
# their provenance sidecar match the input, flags, weights and toolkit. Docs: docs/pipeline.md.
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

STAGE40_ENV_KEYS=(  # the .env keys this stage and the Docker one read
  DATA_ROOT SID THREADS SYNTHSEG_FLAGS SYNTHSEG_MODELS DEVICE BACKEND ENGINE
  SYNTHSEG_HOME DOCKER_IMAGE DOCKER_SYNTHSEG_CMD)

#######################################
# Reads the stage's keys from a KEY=VALUE file without executing it. Values may be quoted;
# unquoted values lose a trailing " # comment". Variables already set (non-empty) in the
# environment win, so `make` can pass an empty knob without hiding the file's value.
# Arguments: the file (a missing file is not an error).
#######################################
stage40::read_env() {
  local file="$1" line key value
  [[ -f "${file}" ]] || return 0
  while IFS= read -r line || [[ -n "${line}" ]]; do
    line="${line%$'\r'}"
    [[ "${line}" =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
    key="${BASH_REMATCH[2]}"
    value="${BASH_REMATCH[3]}"
    if [[ "${value}" =~ ^\"(.*)\"[[:space:]]*$ || "${value}" =~ ^\'(.*)\'[[:space:]]*$ ]]; then
      value="${BASH_REMATCH[1]}"
    else
      value="${value%%[[:space:]]#*}"
      value="${value%"${value##*[![:space:]]}"}"
    fi
    if [[ " ${STAGE40_ENV_KEYS[*]} " == *" ${key} "* && -z "${!key:-}" ]]; then
      printf -v "${key}" '%s' "${value}"
    fi
  done < "${file}"
}

#######################################
# Prints a file name without its folder and its .nii.gz/.nii/.mgz extension.
#######################################
stage40::stem() {
  local name
  name="$(basename -- "$1")"
  case "${name}" in
    *.nii.gz) name="${name%.nii.gz}" ;;
    *.nii) name="${name%.nii}" ;;
    *.mgz) name="${name%.mgz}" ;;
  esac
  printf '%s' "${name}"
}

#######################################
# Sets STAGE40_IN, STAGE40_SEG, STAGE40_VOL and STAGE40_POST from the arguments or from .env.
# Arguments: [IN [OUT]]
#######################################
stage40::resolve_paths() {
  stage40::read_env "${ENV_FILE:-${PROJECT_ROOT}/.env}"
  local out
  if (($# == 0)); then
    [[ -n "${DATA_ROOT:-}" && -n "${SID:-}" ]] \
      || die "no input given and DATA_ROOT/SID are not set (in ${ENV_FILE:-${PROJECT_ROOT}/.env} or the environment)"
    STAGE40_IN="${DATA_ROOT}/derivatives/${SID}/synthsr/${SID}_synthsr.nii.gz"
    out="${DATA_ROOT}/derivatives/${SID}/synthseg/${SID}_synthseg.nii.gz"
  else
    STAGE40_IN="$1"
    out="${2:-$(dirname -- "$1")}"
    case "${out}" in
      *.nii.gz | *.nii | *.mgz) ;;
      *) out="${out%/}/$(stage40::stem "$1")_synthseg.nii.gz" ;;
    esac
  fi
  STAGE40_SEG="${out}"
  STAGE40_VOL="$(dirname -- "${out}")/$(stage40::stem "${out}")_vols.csv"
  STAGE40_POST=""
  if [[ "${POSTERIORS:-0}" == 1 ]]; then
    STAGE40_POST="$(dirname -- "${out}")/$(stage40::stem "${out}")_posteriors.nii.gz"
  fi
}

main() {
  (($# <= 2)) || die "usage: $0 [IN [OUT]]  (see docs/pipeline.md)"
  stage40::resolve_paths "$@"
  local engine="${ENGINE:-native}" device="${DEVICE:-auto}" backend="${BACKEND:-}" python
  [[ "${engine}" == native || "${engine}" == upstream ]] || die "ENGINE must be native or upstream, not '${engine}'"
  [[ "${device}" =~ ^(auto|cpu|gpu|cuda|mps)$ ]] || die "DEVICE must be auto, cpu, gpu, cuda or mps, not '${device}'"
  [[ -z "${backend}" || "${backend}" =~ ^(tf|torch|auto)$ ]] || die "BACKEND must be tf, torch or auto, not '${backend}'"
  local -a flags=() args
  read -r -a flags <<< "${SYNTHSEG_FLAGS:-}"  # word-split on purpose: several flags in one variable
  log_info "input:   ${STAGE40_IN}"
  log_info "outputs: ${STAGE40_SEG}, ${STAGE40_VOL}${STAGE40_POST:+, ${STAGE40_POST}}"
  log_info "engine:  ${engine}${backend:+ (${backend} backend)}, device: ${device}${flags[*]:+, flags: ${flags[*]}}"
  [[ -f "${STAGE40_IN}" ]] || die "input not found: ${STAGE40_IN} (run step 30 first, or pass an image)"
  python="$(venv_python)"

  args=(--i "${STAGE40_IN}" --o "${STAGE40_SEG}" --vol "${STAGE40_VOL}" --engine "${engine}")
  args+=(${flags[@]+"${flags[@]}"})  # this form keeps an empty array legal under set -u in bash 3.2
  [[ -z "${STAGE40_POST}" ]] || args+=(--post "${STAGE40_POST}")
  [[ -z "${THREADS:-}" ]] || args+=(--threads "${THREADS}")
  [[ "${device}" != cpu ]] || args+=(--cpu)
  [[ ! "${device}" =~ ^(cuda|mps)$ ]] || args+=(--device "${device}")
  [[ -z "${backend}" ]] || args+=(--backend "${backend}")
  [[ -z "${SYNTHSEG_MODELS:-}" ]] || args+=(--models "${SYNTHSEG_MODELS}")
  [[ -z "${SYNTHSEG_HOME:-}" ]] || args+=(--synthseg-home "${SYNTHSEG_HOME}")

  export PYTHONPATH="${PROJECT_ROOT}/synthseg_src${PYTHONPATH:+:${PYTHONPATH}}"
  local -a check=(check)
  [[ "${FORCE:-0}" != 1 ]] || check+=(--force)
  local status=0
  "${python}" -m synthseg_native.batch.provenance "${check[@]}" -- "${args[@]}" || status=$?
  case "${status}" in
    0) return 0 ;;  # up to date; provenance printed the [SKIP] line
    3) ;;
    *) die "cannot check the cache for ${STAGE40_SEG} (exit ${status})" ;;
  esac

  log_run "SynthSeg step 40 (${engine} engine): ${STAGE40_IN}"
  local start="${SECONDS}"
  "${python}" -m synthseg_native "${args[@]}" || die "SynthSeg failed (exit $?) on ${STAGE40_IN}"
  "${python}" -m synthseg_native.batch.provenance write -- "${args[@]}" \
    || die "could not record provenance for ${STAGE40_SEG}"
  log_done "${STAGE40_SEG} and ${STAGE40_VOL} in $((SECONDS - start)) s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
