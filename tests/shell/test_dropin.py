"""Step 40 dropped into somebody else's numbered pipeline: our ``40_synthseg_native.sh`` copied into a host's
``scripts/`` folder, beside the host's own ``_common.sh`` (other functions, ``set -u`` failures when its keys are
missing, folders it creates) and run by the host's runner the way such pipelines call a step
(``bash scripts/40_….sh`` under ``set -euo pipefail``, after ``set -a; source .env``), or alone from a terminal.

The host here is this test's own fixture, written after the public pipeline the stage replaces
(``hwonheo/easy-synthseg``: its ``.env`` keys, paths and status check), not a copy of its code. The toolkit is found
three ways: its ``synthseg-native`` console script on PATH, ``SYNTHSEG_NATIVE`` (environment or ``.env``), and
neither (one ``[ERR]`` naming the three fixes, and the runner stops)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from engine_fixtures import crop_img

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "scripts" / "40_synthseg_native.sh"
CONSOLE_SCRIPT = Path(sys.executable).parent / "synthseg-native"  # what pip installed for this environment

HOST_COMMON = """#!/usr/bin/env bash
# the host pipeline's helpers: other names than ours, and fatal without its own keys
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
set -a
source "${PROJECT_ROOT}/.env"
set +a
: "${DATA_ROOT:?missing DATA_ROOT in .env}"
: "${SID:?missing SID in .env}"
: "${LICENSE_DIR:?missing LICENSE_DIR in .env}"
SYNTHSEG_DIR="${DATA_ROOT}/derivatives/${SID}/synthseg"
mkdir -p "${SYNTHSEG_DIR}"
say() { echo "[host] $*"; }
log_info() { echo "host log_info must not be called by the stage" >&2; exit 99; }
"""
HOST_RUNNER = """#!/usr/bin/env bash
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
source "${SCRIPT_DIR}/_common.sh"
run_step() {
  say "step $1"
  bash "${SCRIPT_DIR}/$1"
}
run_step 40_synthseg_native.sh
say "after step 40: ${SYNTHSEG_DIR}/${SID}_synthseg.nii.gz"
"""


def host_env_file(data: Path, extra: str = "", newline: str = "\n") -> bytes:
    """The host's .env (which its runner sources): its own keys, a comment after a value, even a command."""
    lines = ["# host pipeline settings", f'DATA_ROOT="{data}"', "SID=sub01", "LICENSE_DIR=/opt/license",
             "THREADS=2", "FORCE=0           # 1 re-runs every step", "COMPOSE_OS=linux", "echo sourced",
             'SYNTHSEG_FLAGS="--crop 32"', "DEVICE=cpu", extra]
    return (newline.join(lines) + newline).encode()


@pytest.fixture
def host(tmp_path, mni_img, weights) -> Path:
    """A host pipeline with spaces in its data folder, step 30's output in place, and our stage copied in."""
    root, data = tmp_path / "host pipe", tmp_path / "study data é"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "_common.sh").write_text(HOST_COMMON)
    (root / "scripts" / "90_pipeline.sh").write_text(HOST_RUNNER)
    shutil.copy(STAGE, root / "scripts" / "40_synthseg_native.sh")
    (root / ".env").write_bytes(host_env_file(data, f"SYNTHSEG_MODELS='{weights.need('seg2')}'"))
    src = data / "derivatives" / "sub01" / "synthsr" / "sub01_synthsr.nii.gz"
    src.parent.mkdir(parents=True)
    nib.save(crop_img(mni_img, (70, 80, 60), (40, 48, 40)), str(src))
    return root


def clean_environ(path: list[Path]) -> dict[str, str]:
    """The caller's environment without any of the stage's knobs, with PATH = ``path`` + the system's basics."""
    knobs = {"DATA_ROOT", "SID", "THREADS", "FORCE", "SYNTHSEG_FLAGS", "SYNTHSEG_MODELS", "DEVICE", "BACKEND",
             "ENGINE", "SYNTHSEG_HOME", "POSTERIORS", "ENV_FILE", "PYTHON", "VENV", "SYNTHSEG_NATIVE"}
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    basics = sorted({str(Path(shutil.which(t) or "/bin/sh").parent) for t in ("bash", "mkdir", "dirname")})
    env.update(PATH=os.pathsep.join([*map(str, path), *basics]), TF_CPP_MIN_LOG_LEVEL="3")
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def outputs(host: Path) -> Path:
    data = Path(next(ln for ln in (host / ".env").read_text().splitlines() if ln.startswith("DATA_ROOT"))
                .split("=", 1)[1].strip('"'))
    return data / "derivatives" / "sub01" / "synthseg"


def test_copied_stage_runs_in_the_host_pipeline_from_path(host, tmp_path):
    """pip-installed toolkit (the console script on PATH): the host's runner runs step 40, a second run skips, the
    host's FORCE=1 re-runs; the files are where the host's status check and later steps look."""
    assert CONSOLE_SCRIPT.is_file(), "the environment has no synthseg-native console script (pip install -e .)"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "synthseg-native").symlink_to(CONSOLE_SCRIPT)
    env = clean_environ([bin_dir])
    first = run(["bash", "scripts/90_pipeline.sh"], host, env)
    assert first.returncode == 0, first.stdout + first.stderr
    seg_dir = outputs(host)
    assert sorted(p.name for p in seg_dir.iterdir()) == [
        "sub01_synthseg.nii.gz", "sub01_synthseg.nii.gz.provenance.json", "sub01_synthseg_vols.csv"]
    assert "[RUN ] SynthSeg step 40 (native engine)" in first.stdout and "2 thread(s)" in first.stdout
    assert f"[host] after step 40: {seg_dir}/sub01_synthseg.nii.gz" in first.stdout
    assert "host log_info" not in first.stderr and "Traceback" not in first.stderr

    again = run(["bash", "scripts/90_pipeline.sh"], host, env)
    assert again.returncode == 0 and "[SKIP] " in again.stdout and "[RUN ]" not in again.stdout

    alone = run(["bash", "scripts/40_synthseg_native.sh"], host, {**env, "FORCE": "1"})  # a TUI's "re-run"
    assert alone.returncode == 0, alone.stderr
    assert "cache: running because FORCE=1" in alone.stdout and "[DONE] " in alone.stdout


def test_copied_stage_finds_a_checkout_named_in_env_file_or_environment(host, tmp_path, weights):
    """The stage alone, as from a terminal, with a .env saved with Windows line endings that names the checkout."""
    env = clean_environ([])
    data = outputs(host).parents[2]
    (host / ".env").write_bytes(host_env_file(data, f"SYNTHSEG_MODELS={weights.need('seg2')}\r\n"
                                              f"SYNTHSEG_NATIVE='{ROOT}'  # the toolkit", newline="\r\n"))
    first = run(["bash", "scripts/40_synthseg_native.sh"], host, {**env, "PYTHON": sys.executable})
    assert first.returncode == 0, first.stdout + first.stderr
    assert (outputs(host) / "sub01_synthseg_vols.csv").is_file()
    cached = run(["bash", "scripts/40_synthseg_native.sh"], host,
                 {**env, "PYTHON": sys.executable, "SYNTHSEG_NATIVE": str(ROOT)})
    assert cached.returncode == 0 and "[SKIP] " in cached.stdout


def test_copied_stage_without_the_toolkit_is_one_err_and_stops_the_host(host, tmp_path):
    proc = run(["bash", "scripts/90_pipeline.sh"], host, clean_environ([]))
    assert proc.returncode == 1
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("[ERR]")]
    assert len(errs) == 1 and "native SynthSeg toolkit not found" in errs[0]
    assert all(fix in errs[0] for fix in ("SYNTHSEG_NATIVE", "synthseg-native is on PATH", "own scripts/ folder"))
    assert "after step 40" not in proc.stdout
    assert not any(outputs(host).iterdir())  # the host's _common.sh made the folder; the stage wrote nothing


@pytest.mark.parametrize("value, message", [
    ("/no/such/toolkit", "SYNTHSEG_NATIVE=/no/such/toolkit is neither a toolkit checkout nor a synthseg-native "
                         "executable"),
    ("{tmp}", "SYNTHSEG_NATIVE={tmp} is not a toolkit checkout (no synthseg_src/synthseg_native)"),
])
def test_bad_synthseg_native_is_one_err(tmp_path, value, message):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(STAGE, scripts)
    value, message = value.format(tmp=tmp_path), message.format(tmp=tmp_path)
    proc = run(["bash", str(scripts / STAGE.name), "x.nii.gz"], tmp_path,
               {**clean_environ([]), "SYNTHSEG_NATIVE": value})
    assert proc.returncode == 1 and proc.stderr == f"[ERR] {message}\n"


def test_synthseg_native_may_name_the_executable(tmp_path):
    """No engine run: a missing input is reported by the Python stage the executable starts (one process)."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(STAGE, scripts)
    proc = run(["bash", str(scripts / STAGE.name), "missing.nii.gz"], tmp_path,
               {**clean_environ([]), "SYNTHSEG_NATIVE": str(CONSOLE_SCRIPT), "ENV_FILE": str(tmp_path / "none")})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "[ERR] input not found: missing.nii.gz (run step 30 first, or pass an image)"
