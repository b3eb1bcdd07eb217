#!/usr/bin/env bash
# The torch backend on a lent CUDA GPU, in one short call (docs/performance.md, "GPU check").
#
#   scripts/gpu_check.sh prepare   here: carried wheels, the MNI152 input and the CPU reference in GPU_CHECK_DIR
#   scripts/gpu_check.sh run       there: installs the carried wheels offline, times every mode and precision,
#                                  compares with the reference, writes summary.json/.md to $OUT (or results/gpu_check)
#
# Knobs: GPU_CHECK_DIR (default build/gpu_check: carry it), DEVICE (run: cuda; cpu tests the same path here),
# PYTHON (default: the project's .venv for prepare, python3 for run), SCANS (5), MODES, PRECISIONS, GPU_PY (3.12:
# the device's Python, for the wheels), SYNTHSEG_MODELS (official weights; default seeded test weights).
set -euo pipefail

# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

readonly DIR="${GPU_CHECK_DIR:-${PROJECT_ROOT}/build/gpu_check}"
# Packages the device lacks: nibabel (pure Python). Its needs (numpy, packaging, typing-extensions) and the rest of
# the engine's (scipy, h5py, tqdm, torch) are there; --no-deps keeps a carried numpy from shadowing the device's.
readonly WHEELS=(nibabel)

step="${1:-}"
(($# > 0)) && shift
models=()
[[ -z "${SYNTHSEG_MODELS:-}" ]] || models=(--models "${SYNTHSEG_MODELS}")
read -r -a modes <<< "${MODES:-default fast robust parcqc}"

case "${step}" in
  prepare)
    python="$(venv_python)"
    mkdir -p "${DIR}/wheels"
    log_run "wheels for Python ${GPU_PY:-3.12} (${WHEELS[*]}) into ${DIR}/wheels"
    "${python}" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${GPU_PY:-3.12}" \
      --platform manylinux2014_x86_64 --dest "${DIR}/wheels" "${WHEELS[@]}" \
      || die "pip download of ${WHEELS[*]} failed (needs PyPI)"
    image="${GPU_CHECK_IMAGE:-}"
    if [[ -z "${image}" ]]; then
      image="${DIR}/mni152_t1_1mm.nii.gz"
      "${python}" -c 'import sys; from pathlib import Path; from synthseg_native.tools.demo import mni152_t1
sys.exit(0 if mni152_t1(Path(sys.argv[1])) else 1)' "${image}" || die "cannot write the MNI152 T1 (nilearn)"
    fi
    PYTHONPATH="${PROJECT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" "${python}" -m devtools.gpucheck reference --image "${image}" --out "${DIR}" --copy-image \
      --modes "${modes[@]}" ${models[@]+"${models[@]}"} "$@"
    log_done "carry ${DIR} ($(du -sh "${DIR}" | cut -f1)) and run: bash scripts/gpu_check.sh run"
    ;;
  run)
    python="${PYTHON:-python3}"
    site="${DIR}/site"
    if ! "${python}" -c 'import nibabel' >/dev/null 2>&1; then
      log_run "installing the carried wheels (${WHEELS[*]}) into ${site}, offline"
      "${python}" -m pip install --quiet --no-index --no-deps --find-links "${DIR}/wheels" --target "${site}" \
        "${WHEELS[@]}" \
        || die "offline install from ${DIR}/wheels failed: run 'scripts/gpu_check.sh prepare' here first"
    fi
    export PYTHONPATH="${PROJECT_ROOT}:${PROJECT_ROOT}/synthseg_src:${site}${PYTHONPATH:+:${PYTHONPATH}}"
    read -r -a precisions <<< "${PRECISIONS:-fp32 bf16}"
    "${python}" -m devtools.gpucheck run --ref "${DIR}" --out "${OUT:-${PROJECT_ROOT}/results/gpu_check}" \
      --device "${DEVICE:-cuda}" --scans "${SCANS:-5}" --modes "${modes[@]}" --precisions "${precisions[@]}" \
      ${models[@]+"${models[@]}"} "$@"
    ;;
  *) die "usage: $0 prepare|run [extra gpucheck options] (see docs/performance.md)" ;;
esac
