#!/usr/bin/env bash
# make setup: build the project's Python environment for this platform.
#
#   macOS arm64   tensorflow 2.15.1 + keras 2.15.0 + tensorflow-metal 1.1.0
#   macOS x86_64  tensorflow 2.15.1 (CPU)
#   Linux         tensorflow 2.15.1 (CPU); GPU=cuda adds tensorflow[and-cuda]==2.15.1
#
# Knobs: PYTHON (interpreter 3.9-3.11), VENV (default .venv), GPU=cuda, FORCE=1 (rebuild),
# DRY_RUN=1 (print the plan, install nothing), SETUP_UNAME_S / SETUP_UNAME_M (simulate a platform).
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

readonly TF_VERSION="2.15.1"
readonly REQUIREMENTS="${PROJECT_ROOT}/requirements-metal.txt"

uname_s="${SETUP_UNAME_S:-$(uname -s)}"
uname_m="${SETUP_UNAME_M:-$(uname -m)}"
gpu="${GPU:-}"

case "${uname_s}-${uname_m}" in
  Darwin-arm64) platform="darwin-arm64"; flavour="metal" ;;
  Darwin-x86_64) platform="darwin-x86_64"; flavour="cpu" ;;
  Linux-x86_64 | Linux-amd64) platform="linux-x86_64"; flavour="cpu" ;;
  Linux-aarch64 | Linux-arm64) platform="linux-aarch64"; flavour="cpu" ;;
  *) die "unsupported platform ${uname_s} ${uname_m}: supported are macOS arm64 (Metal), macOS x86_64 and Linux x86_64/aarch64" ;;
esac
if [[ -n "${gpu}" ]]; then
  [[ "${gpu}" == "cuda" ]] || die "GPU=${gpu} is not supported: use GPU=cuda (Linux) or leave GPU unset"
  [[ "${platform}" == linux-* ]] || die "GPU=cuda needs Linux; on ${platform} the ${flavour} build is used"
  flavour="cuda"
fi

# python_version PY: prints major.minor, or nothing when PY does not run.
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

supported() {
  case "$1" in 3.9 | 3.10 | 3.11) return 0 ;; *) return 1 ;; esac
}

find_python() {
  local candidate version
  if [[ -n "${PYTHON:-}" ]]; then
    version="$(python_version "${PYTHON}")"
    [[ -n "${version}" ]] || die "PYTHON=${PYTHON} does not run; tensorflow ${TF_VERSION} needs Python 3.9-3.11"
    supported "${version}" || die "PYTHON=${PYTHON} is Python ${version}; tensorflow ${TF_VERSION} needs Python 3.9-3.11"
    printf '%s\n' "${PYTHON}"
    return 0
  fi
  for candidate in python3.11 python3.10 python3.9 python3; do
    command -v "${candidate}" >/dev/null 2>&1 || continue
    version="$(python_version "${candidate}")"
    if [[ -n "${version}" ]] && supported "${version}"; then
      command -v "${candidate}"
      return 0
    fi
  done
  local conda_bin
  for conda_bin in mamba conda; do
    if command -v "${conda_bin}" >/dev/null 2>&1; then
      log_info "no Python 3.9-3.11 found; creating conda env synthseg-metal with Python 3.11" >&2
      if [[ "${DRY_RUN:-0}" != "1" ]]; then
        "${conda_bin}" create -y -q -n synthseg-metal python=3.11 >&2
        "${conda_bin}" run -n synthseg-metal python -c 'import sys; print(sys.executable)'
      else
        printf 'conda:synthseg-metal\n'
      fi
      return 0
    fi
  done
  die "no Python 3.9-3.11 found (tensorflow ${TF_VERSION} needs one): install it, e.g. 'brew install python@3.11' (macOS), 'apt-get install python3.11 python3.11-venv' (Debian/Ubuntu) or 'pyenv install 3.11', then re-run with PYTHON=/path/to/python3.11 make setup"
}

python_bin="$(find_python)"
venv="${VENV:-${PROJECT_ROOT}/.venv}"
[[ "${venv}" = /* ]] || venv="${PROJECT_ROOT}/${venv}"

packages=("-r" "${REQUIREMENTS}")
[[ "${flavour}" == "cuda" ]] && packages+=("tensorflow[and-cuda]==${TF_VERSION}")

log_info "platform ${platform} (${flavour}), Python ${python_bin}, environment ${venv}"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf 'PLAN platform=%s flavour=%s python=%s venv=%s\n' "${platform}" "${flavour}" "${python_bin}" "${venv}"
  printf 'PLAN install %s\n' "${packages[*]}"
  "${python_bin}" - "${REQUIREMENTS}" "${platform}" <<'PY' 2>/dev/null || true
import sys
from packaging.markers import Marker
from packaging.requirements import Requirement
env = {"darwin-arm64": ("darwin", "arm64"), "darwin-x86_64": ("darwin", "x86_64"),
       "linux-x86_64": ("linux", "x86_64"), "linux-aarch64": ("linux", "aarch64")}[sys.argv[2]]
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"sys_platform": env[0], "platform_machine": env[1]}):
        print(f"PLAN package {req.name}{req.specifier}")
PY
  exit 0
fi

hash_inputs() {
  local tool=(sha256sum)
  command -v sha256sum >/dev/null 2>&1 || tool=(shasum -a 256)
  { cat "${REQUIREMENTS}" "${PROJECT_ROOT}/pyproject.toml"; printf '%s %s %s\n' "${platform}" "${flavour}" \
    "$(python_version "${python_bin}")"; } | "${tool[@]}" | cut -d' ' -f1
}
stamp="${venv}/.setup-stamp"
want="$(hash_inputs)"

if [[ "${FORCE:-0}" != "1" && -x "${venv}/bin/python" && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
  log_skip "environment ${venv} is up to date (FORCE=1 rebuilds)"
else
  [[ "${FORCE:-0}" == "1" && -d "${venv}" ]] && rm -rf "${venv}"
  log_run "creating ${venv}"
  "${python_bin}" -m venv "${venv}"
  log_run "installing ${packages[*]}"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "${PROJECT_ROOT}"
  printf '%s\n' "${want}" >"${stamp}"
  log_done "environment ready in ${venv}"
fi

if ! command -v hyperfine >/dev/null 2>&1; then
  log_warn "hyperfine not found (make bench needs it): 'apt-get install hyperfine', 'brew install hyperfine' or 'cargo install hyperfine' (never 'pip install hyperfine': that PyPI package is an unrelated physics library)"
fi
if ! command -v shellcheck >/dev/null 2>&1; then
  log_warn "shellcheck not found (make test/lint need it): 'apt-get install shellcheck' or 'brew install shellcheck'"
fi

"${venv}/bin/python" -m synthseg_native.devices
