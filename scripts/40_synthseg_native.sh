#!/usr/bin/env bash
# Pipeline step 40: SynthSeg with the native toolkit. One file: copy it into any numbered pipeline's
# scripts/ folder; it sources nothing there. All logic is `synthseg-native stage` (docs/pipeline.md).
#
# Usage: scripts/40_synthseg_native.sh [IN [OUT]]
#   no arguments  $DATA_ROOT/derivatives/$SID/synthsr/${SID}_synthsr.nii.gz -> …/synthseg/${SID}_synthseg.nii.gz
#                 and ${SID}_synthseg_vols.csv; IN [OUT]: an image, and a segmentation file or a folder
# Settings: the pipeline's .env (in the folder above this script's; ENV_FILE overrides), read, never executed,
# and the environment, which wins: DATA_ROOT SID THREADS FORCE SYNTHSEG_FLAGS SYNTHSEG_MODELS DEVICE BACKEND
# ENGINE SYNTHSEG_HOME POSTERIORS.
# The toolkit: $SYNTHSEG_NATIVE (a toolkit checkout or a synthseg-native executable; in the environment or the
# .env), else synthseg-native on PATH (pip-installed), else the checkout this script sits in. A checkout runs
# with its .venv ($VENV, or the interpreter $PYTHON).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${ENV_FILE:-$(dirname "${here}")/.env}"

fail() {
  printf '[ERR] %s\n' "$*" >&2
  exit 1
}

# env_value KEY: the last value of KEY in the .env file (quotes, a trailing comment and a CR dropped).
env_value() {
  local line value=""
  [[ -f "${env_file}" ]] || return 0
  while IFS= read -r line || [[ -n "${line}" ]]; do
    [[ "${line%$'\r'}" =~ ^[[:space:]]*(export[[:space:]]+)?$1=(.*)$ ]] || continue
    value="${BASH_REMATCH[2]}"
    if [[ "${value}" =~ ^[\"\'](.*)[\"\'][[:space:]]*(#.*)?$ ]]; then
      value="${BASH_REMATCH[1]}"
    else
      value="${value%%[[:space:]]#*}"
    fi
  done < "${env_file}"
  printf '%s' "${value%"${value##*[![:space:]]}"}"
}

toolkit="${SYNTHSEG_NATIVE:-$(env_value SYNTHSEG_NATIVE)}"
if [[ -n "${toolkit}" && ! -d "${toolkit}" ]]; then
  [[ -f "${toolkit}" && -x "${toolkit}" ]] \
    || fail "SYNTHSEG_NATIVE=${toolkit} is neither a toolkit checkout nor a synthseg-native executable"
  exec "${toolkit}" stage --env-file "${env_file}" "$@"
elif [[ -z "${toolkit}" ]] && command -v synthseg-native > /dev/null 2>&1; then
  exec synthseg-native stage --env-file "${env_file}" "$@"
fi
checkout="${toolkit:-$(dirname "${here}")}"
if [[ ! -f "${checkout}/synthseg_src/synthseg_native/stage.py" ]]; then
  [[ -z "${toolkit}" ]] || fail "SYNTHSEG_NATIVE=${toolkit} is not a toolkit checkout (no synthseg_src/synthseg_native)"
  fail "native SynthSeg toolkit not found: set SYNTHSEG_NATIVE to its checkout or to a synthseg-native executable" \
    "(in the environment or ${env_file}), or pip-install it so that synthseg-native is on PATH, or run the" \
    "copy of this script in the toolkit's own scripts/ folder"
fi
venv="${VENV:-.venv}"
[[ "${venv}" = /* ]] || venv="${checkout}/${venv}"
python="${PYTHON:-${venv}/bin/python}"
command -v "${python}" > /dev/null 2>&1 || fail "no Python environment at ${venv}: run 'make setup' in ${checkout}"
export PYTHONPATH="${checkout}/synthseg_src${PYTHONPATH:+:${PYTHONPATH}}"
exec "${python}" -m synthseg_native stage --env-file "${env_file}" "$@"
