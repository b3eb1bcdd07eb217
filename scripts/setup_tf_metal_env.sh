#!/usr/bin/env bash
# make setup: build the project's Python environment for this platform.
#
#   macOS arm64   tensorflow 2.15.1 + keras 2.15.0 + tensorflow-metal 1.1.0, torch (MPS)
#   macOS x86_64  tensorflow 2.15.1 (CPU), torch
#   Linux         tensorflow 2.15.1 (CPU), torch (CPU build); GPU=cuda adds tensorflow[and-cuda]==2.15.1 and
#                 takes PyPI's CUDA build of torch
#   BACKEND=torch the PyTorch backend alone (requirements-torch.txt, numpy 2, no TensorFlow) on Python 3.10-3.13,
#                 in .venv-torch by default
#
# Knobs: BACKEND (tf: the default, or torch), PYTHON (interpreter: 3.9-3.11; 3.10-3.13 with BACKEND=torch),
# VENV (default .venv, .venv-torch with BACKEND=torch), GPU=cuda, TORCH_CPU_INDEX (Linux CPU wheels of torch;
# empty: only the configured indexes), FORCE=1 (rebuild),
# DRY_RUN=1 (print the plan, install nothing), SETUP_UNAME_S / SETUP_UNAME_M (simulate a platform).
# The environment is stamped with a hash of requirements-metal.txt, pyproject.toml, the platform and
# the Python version: a second run with the same inputs only reports. Which packages a platform gets
# is decided by the markers in requirements-metal.txt (see devtools/platforms.py).
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

readonly TF_VERSION="2.15.1"
readonly BACKEND="${BACKEND:-tf}"
case "${BACKEND}" in
  tf) readonly REQUIREMENTS="${PROJECT_ROOT}/requirements-metal.txt" PYTHONS="3.9-3.11" \
        WHY="tensorflow ${TF_VERSION} needs Python 3.9-3.11" ;;
  torch) readonly REQUIREMENTS="${PROJECT_ROOT}/requirements-torch.txt" PYTHONS="3.10-3.13" \
        WHY="the torch environment supports Python 3.10-3.13" ;;
  *) printf '[ERR] BACKEND=%s is not a backend: use BACKEND=tf (default) or BACKEND=torch\n' "${BACKEND}" >&2; exit 1 ;;
esac
readonly TORCH_CPU_INDEX="${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
readonly CONDA_ENV="synthseg-metal"
readonly DRY="${DRY_RUN:-0}"

uname_s="${SETUP_UNAME_S:-$(uname -s)}"
uname_m="${SETUP_UNAME_M:-$(uname -m)}"
gpu="${GPU:-}"

case "${uname_s}-${uname_m}" in
  Darwin-arm64) platform="darwin-arm64" flavour="metal" ;;
  Darwin-x86_64) platform="darwin-x86_64" flavour="cpu" ;;
  Linux-x86_64 | Linux-amd64) platform="linux-x86_64" flavour="cpu" ;;
  Linux-aarch64 | Linux-arm64) platform="linux-aarch64" flavour="cpu" ;;
  *) die "unsupported platform ${uname_s} ${uname_m}: supported are macOS arm64 (Metal), macOS x86_64 and Linux x86_64/aarch64" ;;
esac
if [[ -n "${gpu}" ]]; then
  [[ "${gpu}" == "cuda" ]] || die "GPU=${gpu} is not supported: use GPU=cuda (Linux) or leave GPU unset"
  [[ "${platform}" == linux-* ]] || die "GPU=cuda needs Linux; on ${platform} leave GPU unset (${flavour} build)"
  flavour="cuda"
fi

# python_version PY: prints major.minor, or nothing when PY does not run.
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

supported() {
  if [[ "${BACKEND}" == torch ]]; then
    case "$1" in 3.10 | 3.11 | 3.12 | 3.13) return 0 ;; *) return 1 ;; esac
  fi
  case "$1" in 3.9 | 3.10 | 3.11) return 0 ;; *) return 1 ;; esac
}

# can_make_venv PY: Debian and Ubuntu ship the venv module (ensurepip) in a separate package.
can_make_venv() {
  "$1" -c 'import ensurepip, venv' >/dev/null 2>&1
}

# How to get a supported interpreter on this OS (one line, for [ERR] messages).
install_hint() {
  if [[ "${uname_s}" == Darwin ]]; then
    printf "install one with 'brew install python@3.11' (or 'pyenv install 3.11')"
  else
    printf "install one with 'apt-get install python3.11 python3.11-venv' (Debian/Ubuntu) or 'pyenv install 3.11'"
  fi
  printf ', then run: PYTHON=/path/to/python3.11 make setup'
}

# find_conda_python: the python of the conda env CONDA_ENV, created with Python 3.11 if needed.
find_conda_python() {
  local conda_bin="$1" path
  if [[ "${DRY}" == "1" ]]; then
    log_info "no Python ${PYTHONS} found; would use ${conda_bin} env ${CONDA_ENV} (Python 3.11)" >&2
    printf 'conda:%s\n' "${CONDA_ENV}"
    return 0
  fi
  path="$("${conda_bin}" run -n "${CONDA_ENV}" python -c 'import sys; print(sys.executable)' 2>/dev/null | tail -n 1)" \
    || path=""
  if [[ -z "${path}" ]]; then
    log_run "no Python ${PYTHONS} found; creating ${conda_bin} env ${CONDA_ENV} with Python 3.11" >&2
    "${conda_bin}" create -y -q -n "${CONDA_ENV}" python=3.11 >&2 \
      || die "'${conda_bin} create -n ${CONDA_ENV} python=3.11' failed; $(install_hint)"
    path="$("${conda_bin}" run -n "${CONDA_ENV}" python -c 'import sys; print(sys.executable)' | tail -n 1)"
  fi
  supported "$(python_version "${path}")" || die "conda env ${CONDA_ENV} has no Python ${PYTHONS} (${path}); $(install_hint)"
  printf '%s\n' "${path}"
}

# find_python: prints the interpreter to build the environment with, or exits with one [ERR] line.
find_python() {
  local candidate path version no_venv="" conda_bin
  if [[ -n "${PYTHON:-}" ]]; then
    version="$(python_version "${PYTHON}")"
    [[ -n "${version}" ]] \
      || die "PYTHON=${PYTHON} does not run as Python; ${WHY}: $(install_hint)"
    supported "${version}" \
      || die "PYTHON=${PYTHON} is Python ${version}; ${WHY}: $(install_hint)"
    can_make_venv "${PYTHON}" \
      || die "PYTHON=${PYTHON} (Python ${version}) cannot create virtual environments: apt-get install python${version}-venv"
    printf '%s\n' "${PYTHON}"
    return 0
  fi
  local candidates=(python3.11 python3.10 python3.9 python3)
  [[ "${BACKEND}" != torch ]] || candidates=(python3.12 python3.13 python3.11 python3.10 python3)
  for candidate in "${candidates[@]}"; do
    path="$(command -v "${candidate}" 2>/dev/null)" || continue
    version="$(python_version "${path}")"
    if [[ -n "${version}" ]] && supported "${version}"; then
      if can_make_venv "${path}"; then
        printf '%s\n' "${path}"
        return 0
      fi
      no_venv="${no_venv:-${path} is Python ${version} but cannot create virtual environments: apt-get install python${version}-venv}"
    fi
  done
  [[ -z "${no_venv}" ]] || die "${no_venv}"
  for conda_bin in mamba conda; do
    if command -v "${conda_bin}" >/dev/null 2>&1; then
      find_conda_python "${conda_bin}"
      return 0
    fi
  done
  die "no Python ${PYTHONS} found (${WHY}): $(install_hint)"
}

python_bin="$(find_python)"
default_venv=".venv"
[[ "${BACKEND}" != torch ]] || default_venv=".venv-torch"
venv="${VENV:-${PROJECT_ROOT}/${default_venv}}"
[[ "${venv}" = /* ]] || venv="${PROJECT_ROOT}/${venv}"
stamp="${venv}/.setup-stamp"
packages=(-r "${REQUIREMENTS}")
[[ "${flavour}" != "cuda" || "${BACKEND}" == torch ]] || packages+=("tensorflow[and-cuda]==${TF_VERSION}")
# Linux without GPU=cuda: PyTorch's CPU build (PyPI's Linux wheel is the CUDA one, several GB with its libraries)
# index_reachable URL: whether pip could read URL (an offline mirror or a closed network cannot: pip would retry
# it for every package, minutes in all, before falling back to the configured indexes anyway).
index_reachable() {
  "${python_bin}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" \
    >/dev/null 2>&1
}
if [[ "${platform}" == linux-* && "${flavour}" == "cpu" && -n "${TORCH_CPU_INDEX}" && "${DRY}" != 1 ]]; then
  if index_reachable "${TORCH_CPU_INDEX%/}/torch/"; then
    packages+=(--extra-index-url "${TORCH_CPU_INDEX}")
  else
    log_warn "PyTorch's CPU index ${TORCH_CPU_INDEX} is unreachable: torch comes from the configured indexes," \
      "which on Linux means PyPI's CUDA build (several GB of downloads); set TORCH_CPU_INDEX to a reachable mirror" \
      "of PyTorch's CPU wheels to avoid it"
  fi
elif [[ "${platform}" == linux-* && "${flavour}" == "cpu" && -n "${TORCH_CPU_INDEX}" ]]; then
  packages+=(--extra-index-url "${TORCH_CPU_INDEX}")
fi
py_version="$(python_version "${python_bin}")"

# The stamp: what the environment was built from. Any change means a rebuild.
stamp_hash() {
  local tool=(sha256sum)
  command -v sha256sum >/dev/null 2>&1 || tool=(shasum -a 256)
  { cat "${REQUIREMENTS}" "${PROJECT_ROOT}/pyproject.toml"
    printf '%s %s %s %s\n' "${platform}" "${flavour}" "${py_version}" "${BACKEND}"; } | "${tool[@]}" | cut -d' ' -f1
}
want="$(stamp_hash)"
if [[ "${FORCE:-0}" == "1" ]]; then
  action="rebuild"
elif [[ -x "${venv}/bin/python" && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
  action="skip"
elif [[ -x "${venv}/bin/python" && "$(python_version "${venv}/bin/python")" == "${py_version}" ]]; then
  action="update"  # same interpreter: pip brings the pinned packages in line
else
  action="rebuild"
fi

log_info "backend ${BACKEND}, platform ${platform} (${flavour}), Python ${py_version:-?} at ${python_bin}, environment ${venv}"
if [[ "${DRY}" == "1" ]]; then
  printf 'PLAN backend=%s platform=%s flavour=%s python=%s version=%s venv=%s action=%s\n' "${BACKEND}" \
    "${platform}" "${flavour}" "${python_bin}" "${py_version:-?}" "${venv}" "${action}"
  printf 'PLAN install %s\n' "${packages[*]}"
  if [[ -n "${py_version}" ]]; then
    tf_gpu=""  # tensorflow[and-cuda] belongs to the TF backend only; torch's CUDA wheel is the PyPI default
    [[ "${BACKEND}" == torch ]] || tf_gpu="${gpu}"
    PYTHONPATH="${PROJECT_ROOT}:${PROJECT_ROOT}/synthseg_src" "${python_bin}" -m devtools.platforms "${REQUIREMENTS}" \
      "${platform}" --python "${py_version}" ${tf_gpu:+--gpu "${tf_gpu}"}
  fi
  exit 0
fi

if [[ "${action}" == "skip" ]]; then
  touch "${stamp}"  # newer than its inputs again, so make's stamp rule stays quiet
  log_skip "environment ${venv} is up to date (FORCE=1 rebuilds)"
else
  if [[ "${action}" == "rebuild" && -e "${venv}" ]]; then
    [[ -f "${venv}/pyvenv.cfg" || -z "$(ls -A "${venv}")" ]] \
      || die "VENV=${venv} exists and is not a virtual environment: remove it or choose another VENV"
    log_run "removing ${venv}"
    rm -rf "${venv}"
  fi
  rm -f "${stamp}"
  if [[ ! -x "${venv}/bin/python" ]]; then
    log_run "${python_bin} -m venv ${venv}"
    "${python_bin}" -m venv "${venv}"
  fi
  log_run "pip install ${packages[*]} (a few minutes the first time)"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
  log_run "pip install --no-deps -e ${PROJECT_ROOT}"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "${PROJECT_ROOT}"
  printf '%s\n' "${want}" > "${stamp}"
  log_done "environment ready in ${venv}"
fi

if ! command -v hyperfine >/dev/null 2>&1; then
  log_info "hyperfine not found (the benchmarks need it): 'apt-get install hyperfine', 'brew install hyperfine' or 'cargo install hyperfine' (never 'pip install hyperfine': that PyPI package is an unrelated physics library)"
fi
if ! command -v shellcheck >/dev/null 2>&1; then
  log_info "shellcheck not found (make test and make lint need it): 'apt-get install shellcheck' or 'brew install shellcheck'"
fi

log_info "device report (make doctor):"
"${venv}/bin/python" -m synthseg_native.tools.doctor
