#!/usr/bin/env bash
# make cohort's workflow environment: Snakemake and its SLURM executor plugin, in their own venv.
#
# Why a second environment: every Snakemake 8/9 release needs wrapt >= 1.15 while tensorflow 2.15.1 pins
# wrapt < 1.15, so the two cannot share .venv. Snakemake only schedules jobs; every job runs .venv's engine.
#
# Knobs: WORKFLOW_VENV (default .venv-workflow), WORKFLOW_PYTHON (an interpreter >= 3.11; default: the first
# of python3.13, python3.12, python3.11, python3 that is new enough), FORCE=1 (rebuild).
# The environment is stamped with a hash of requirements-workflow.txt and the Python version: a second run
# with the same inputs only reports.
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

readonly REQUIREMENTS="${PROJECT_ROOT}/requirements-workflow.txt"

# new_enough PY: true when PY runs and is Python >= 3.11 with the venv module.
new_enough() {
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

find_python() {
  local candidate path
  if [[ -n "${WORKFLOW_PYTHON:-}" ]]; then
    new_enough "${WORKFLOW_PYTHON}" \
      || die "WORKFLOW_PYTHON=${WORKFLOW_PYTHON} is not a Python >= 3.11 with venv (Snakemake 8+ needs one)"
    printf '%s\n' "${WORKFLOW_PYTHON}"
    return 0
  fi
  for candidate in python3.13 python3.12 python3.11 python3; do
    path="$(command -v "${candidate}" 2>/dev/null)" || continue
    if new_enough "${path}"; then
      printf '%s\n' "${path}"
      return 0
    fi
  done
  die "no Python >= 3.11 with venv found (Snakemake 8+ needs one): install python3.11 and set WORKFLOW_PYTHON"
}

python_bin="$(find_python)"
venv="${WORKFLOW_VENV:-${PROJECT_ROOT}/.venv-workflow}"
[[ "${venv}" = /* ]] || venv="${PROJECT_ROOT}/${venv}"
stamp="${venv}/.setup-stamp"
py_version="$("${python_bin}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
hash_tool=(sha256sum)
command -v sha256sum >/dev/null 2>&1 || hash_tool=(shasum -a 256)
want="$({ cat "${REQUIREMENTS}"; printf '%s\n' "${py_version}"; } | "${hash_tool[@]}" | cut -d' ' -f1)"

if [[ "${FORCE:-0}" != 1 && -x "${venv}/bin/snakemake" && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
  touch "${stamp}"  # newer than requirements-workflow.txt again, so make's stamp rule stays quiet
  log_skip "workflow environment ${venv} is up to date (FORCE=1 rebuilds)"
  exit 0
fi
if [[ -e "${venv}" ]]; then
  [[ -f "${venv}/pyvenv.cfg" ]] || die "WORKFLOW_VENV=${venv} exists and is not a virtual environment"
  log_run "removing ${venv}"
  rm -rf "${venv}"
fi
log_run "${python_bin} -m venv ${venv} (Python ${py_version})"
"${python_bin}" -m venv "${venv}"
log_run "pip install -r requirements-workflow.txt (about a minute the first time)"
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check -r "${REQUIREMENTS}"
printf '%s\n' "${want}" > "${stamp}"
log_done "workflow environment ready: ${venv}/bin/snakemake $("${venv}/bin/snakemake" --version)"
