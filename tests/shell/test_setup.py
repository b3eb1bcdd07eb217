"""make setup: platform detection, interpreter checks, requirement markers, idempotence.

Everything runs the real scripts/setup_tf_metal_env.sh, either with DRY_RUN=1 (prints the plan) or
with a fake interpreter that records what it was asked to do, so no test touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from devtools import platforms

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup_tf_metal_env.sh"
KNOBS = ("GPU", "FORCE", "PYTHON", "DRY_RUN", "VENV", "SETUP_UNAME_S", "SETUP_UNAME_M", "BACKEND", "TORCH_CPU_INDEX")


def setup(env: dict[str, str], dry: bool = True) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in KNOBS}
    full.update({"PYTHON": sys.executable} | ({"DRY_RUN": "1"} if dry else {}) | env)
    return subprocess.run(["bash", str(SETUP)], env=full, capture_output=True, text=True, timeout=120)


def planned(out: str) -> set[str]:
    return {line.split()[2] for line in out.splitlines() if line.startswith("PLAN package")}


def plan(out: str) -> dict[str, str]:
    line = next(x for x in out.splitlines() if x.startswith("PLAN backend="))
    return dict(item.split("=", 1) for item in line.split()[1:])


def one_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("[ERR]")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("uname, gpu, flavour, metal", [
    (("Darwin", "arm64"), "", "metal", True),
    (("Darwin", "x86_64"), "", "cpu", False),
    (("Linux", "x86_64"), "", "cpu", False),
    (("Linux", "aarch64"), "", "cpu", False),
    (("Linux", "x86_64"), "cuda", "cuda", False),
    (("Linux", "aarch64"), "cuda", "cuda", False),
])
def test_platform_plan(uname, gpu, flavour, metal):
    r = setup({"SETUP_UNAME_S": uname[0], "SETUP_UNAME_M": uname[1], "GPU": gpu})
    assert r.returncode == 0, r.stderr
    assert plan(r.stdout)["flavour"] == flavour
    assert plan(r.stdout)["platform"] in platforms.MARKER_ENV
    assert plan(r.stdout)["version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    packages = planned(r.stdout)
    assert {"tensorflow==2.15.1", "keras==2.15.0", "numpy==1.26.4", "torch==2.13.0"} <= packages
    install = next(x for x in r.stdout.splitlines() if x.startswith("PLAN install"))
    # Linux CPU: torch's CPU wheels (PyPI's Linux wheel is the CUDA build); GPU=cuda and macOS: PyPI's
    assert ("--extra-index-url https://download.pytorch.org/whl/cpu" in install) is (
        uname[0] == "Linux" and flavour == "cpu")
    assert ("tensorflow-metal==1.1.0" in packages) is metal
    assert ("tensorflow[and-cuda]==2.15.1" in packages) is (flavour == "cuda")
    assert "[RUN ]" not in r.stdout and "[DONE]" not in r.stdout  # a dry run installs nothing


@pytest.mark.parametrize("uname, gpu", [(("FreeBSD", "amd64"), ""), (("Linux", "riscv64"), ""),
                                        (("Darwin", "arm64"), "cuda"), (("Linux", "x86_64"), "rocm")])
def test_unsupported_platform_is_one_error_line(uname, gpu):
    r = setup({"SETUP_UNAME_S": uname[0], "SETUP_UNAME_M": uname[1], "GPU": gpu})
    error = one_error(r)
    assert r.stdout == ""
    assert "supported" in error or "GPU=" in error


def test_python_that_does_not_run():
    r = setup({"PYTHON": "/usr/bin/false"})
    error = one_error(r)
    assert r.stderr.strip() == error
    assert "3.9-3.11" in error and "PYTHON=" in error and "install" in error


def fake_python(folder: Path, version: str, has_venv: bool = True) -> Path:
    fake = folder / f"python{version}"
    venv_check = "" if has_venv else 'case "$2" in *ensurepip*) exit 1;; esac\n'
    fake.write_text(f"#!/bin/sh\n{venv_check}echo {version}\n")
    fake.chmod(0o755)
    return fake


def test_python_too_new(tmp_path):
    r = setup({"PYTHON": str(fake_python(tmp_path, "3.12"))})
    assert "Python 3.12" in one_error(r)


@pytest.mark.skipif(not Path("/root/.pyenv/versions/3.12.1/bin/python3.12").exists(), reason="no real 3.12 here")
def test_real_python_312():
    assert "is Python 3.12" in one_error(setup({"PYTHON": "/root/.pyenv/versions/3.12.1/bin/python3.12"}))


def test_python_without_venv_module(tmp_path):
    error = one_error(setup({"PYTHON": str(fake_python(tmp_path, "3.11", has_venv=False))}))
    assert "apt-get install python3.11-venv" in error


def bare_path(folder: Path) -> str:
    """A PATH with the tools the script needs but no Python and no conda."""
    folder.mkdir()
    for tool in ("bash", "dirname", "uname", "cat", "cut", "tail", "sha256sum", "ls", "touch", "rm"):
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    return str(folder)


@pytest.mark.parametrize("uname, hint", [("Linux", "apt-get install python3.11"),
                                         ("Darwin", "brew install python@3.11")])
def test_no_python_anywhere(tmp_path, uname, hint):
    env = {"PATH": bare_path(tmp_path / "bin"), "PYTHON": "", "SETUP_UNAME_S": uname, "SETUP_UNAME_M": "arm64"}
    error = one_error(setup(env))
    assert "no Python 3.9-3.11 found" in error and hint in error


def test_conda_fallback_is_planned(tmp_path):
    path = bare_path(tmp_path / "bin")
    conda = Path(path) / "conda"
    conda.write_text("#!/bin/sh\nexit 0\n")
    conda.chmod(0o755)
    r = setup({"PATH": path, "PYTHON": "", "VENV": str(tmp_path / "venv")})
    assert r.returncode == 0, r.stderr
    assert plan(r.stdout)["python"] == "conda:synthseg-metal"
    assert "synthseg-metal" in r.stdout


@pytest.mark.parametrize("platform_env, metal", [(("darwin", "arm64"), True), (("darwin", "x86_64"), False),
                                                 (("linux", "x86_64"), False), (("linux", "aarch64"), False)])
def test_requirement_markers(platform_env, metal):
    env = default_environment() | {"sys_platform": platform_env[0], "platform_machine": platform_env[1]}
    active = set()
    for line in (ROOT / "requirements-metal.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                active.add(req.name)
                assert str(req.specifier).startswith("=="), f"{req.name} must be pinned"
    assert {"tensorflow", "keras", "numpy", "h5py", "nibabel", "scipy", "nilearn", "pytest", "ruff"} <= active
    assert ("tensorflow-metal" in active) is metal
    # platforms.py (what DRY_RUN prints) agrees with packaging's own evaluation
    name = f"{platform_env[0]}-{platform_env[1]}"
    assert {r.split("=")[0] for r in platforms.requirements_for(ROOT / "requirements-metal.txt", name)} == active


def test_numpy_below_2_for_tensorflow_215():
    pins = {Requirement(x.split("#")[0]).name: Requirement(x.split("#")[0]).specifier
            for x in (ROOT / "requirements-metal.txt").read_text().splitlines() if x.split("#")[0].strip()}
    assert not pins["numpy"].contains("2.0.0") and pins["tensorflow"].contains("2.15.1")


# --- idempotence, with an interpreter that records instead of installing ---------------------------

def recording_python(folder: Path, log: Path) -> Path:
    """Answers version checks with the real interpreter; records venv, pip and doctor calls in ``log``."""
    fake = folder / "python3.11"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -m ]]; then
  case "$2" in
    venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && touch "$3/pyvenv.cfg"; echo venv >> "{log}"; exit 0 ;;
    pip) echo "pip ${{*:3}}" >> "{log}"; exit 0 ;;
    synthseg_native.tools.doctor) echo "[INFO] doctor: Conv3D -> device:CPU:0"; echo doctor >> "{log}"; exit 0 ;;
  esac
fi
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    return fake


def test_setup_stamp_makes_second_run_a_no_op(tmp_path):
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    env = {"PYTHON": str(recording_python(tmp_path, log)), "VENV": str(venv),
           "SETUP_UNAME_S": "Linux", "SETUP_UNAME_M": "x86_64"}

    first = setup(env, dry=False)
    assert first.returncode == 0, first.stderr
    assert "[RUN ]" in first.stdout and "[DONE]" in first.stdout and "[SKIP]" not in first.stdout
    calls = log.read_text().splitlines()
    assert calls[0] == "venv" and calls[-1] == "doctor"
    assert any("-r" in c and "requirements-metal.txt" in c for c in calls)
    assert any("--no-deps -e" in c for c in calls)
    assert (venv / ".setup-stamp").read_text().strip()

    log.write_text("")
    start = time.monotonic()
    second = setup(env, dry=False)
    assert second.returncode == 0, second.stderr
    assert "[SKIP]" in second.stdout and "[RUN ]" not in second.stdout
    assert log.read_text().splitlines() == ["doctor"]  # nothing installed, and the report still ends it
    assert time.monotonic() - start < 10

    log.write_text("")
    forced = setup(env | {"FORCE": "1"}, dry=False)
    assert forced.returncode == 0, forced.stderr
    assert "[SKIP]" not in forced.stdout and log.read_text().splitlines()[0] == "venv"

    log.write_text("")
    cuda = setup(env | {"GPU": "cuda"}, dry=False)  # another choice: the stamp no longer matches
    assert cuda.returncode == 0, cuda.stderr
    calls = log.read_text().splitlines()
    assert "venv" not in calls and any("tensorflow[and-cuda]==2.15.1" in c for c in calls)


def test_unreachable_cpu_index_is_a_warning_that_says_what_it_costs(tmp_path):
    """Without PyTorch's CPU index, pip takes PyPI's CUDA build of torch on Linux: several GB, worth a [WARN]."""
    env = {"PYTHON": str(recording_python(tmp_path, tmp_path / "calls.log")), "VENV": str(tmp_path / "venv"),
           "SETUP_UNAME_S": "Linux", "SETUP_UNAME_M": "x86_64", "TORCH_CPU_INDEX": "http://127.0.0.1:9/cpu"}
    r = setup(env, dry=False)
    assert r.returncode == 0, r.stderr
    warn = [line for line in r.stderr.splitlines() if line.startswith("[WARN]")]
    assert len(warn) == 1 and "http://127.0.0.1:9/cpu is unreachable" in warn[0], r.stderr
    assert "PyPI's CUDA build (several GB of downloads)" in warn[0] and "is unreachable" not in r.stdout


def test_refuses_to_replace_a_folder_that_is_not_a_venv(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    r = setup({"PYTHON": str(recording_python(tmp_path, tmp_path / "calls.log")), "VENV": str(folder)}, dry=False)
    assert "not a virtual environment" in one_error(r)
    assert (folder / "data.txt").read_text() == "keep me"


def test_environment_of_this_test_run_is_up_to_date():
    """The venv the tests run in was built by make setup: a dry run of a second setup plans no work."""
    venv = Path(sys.prefix)
    stamp = venv / ".setup-stamp"
    inputs = [ROOT / "requirements-metal.txt", ROOT / "pyproject.toml"]
    if not stamp.is_file() or any(p.stat().st_mtime > stamp.stat().st_mtime for p in inputs):
        pytest.skip("not running inside an up-to-date make setup environment")
    r = setup({"VENV": str(venv)})
    assert r.returncode == 0, r.stderr
    assert plan(r.stdout)["action"] == "skip"


# --- Makefile and repository conventions --------------------------------------------------------------

def test_make_help_lists_every_target_once():
    r = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    targets = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    for target in ("help", "setup", "test", "lint", "doctor", "clean"):
        assert targets.count(target) == 1, r.stdout
    assert all(len(line.split(maxsplit=1)) == 2 for line in r.stdout.splitlines() if line.strip())
    # every description starts in the same column, the longest target name included (gpu-check-prepare)
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in r.stdout.splitlines() if line.strip()}
    assert len(starts) == 1, r.stdout


def test_gitignore_keeps_committed_results():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    assert ignored(".venv/bin/python") and ignored("results/demo/seg.nii.gz") and ignored("models/x.h5")
    assert not ignored("results/2026-01-01-host/bench.json")


# --- BACKEND=torch: no TensorFlow, numpy 2, Python 3.10-3.13 -----------------------------------------------------

def version_faking_python(folder: Path, version: str) -> Path:
    """Says it is Python ``version`` when the setup asks, and is the real interpreter for everything else (the
    dry run's package list)."""
    fake = folder / f"python{version}"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in *version_info*) echo {version}; exit 0 ;; esac
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("uname, gpu", [(("Linux", "x86_64"), ""), (("Linux", "x86_64"), "cuda"),
                                        (("Darwin", "arm64"), "")])
def test_torch_backend_plan(uname, gpu, tmp_path):
    r = setup({"BACKEND": "torch", "PYTHON": str(version_faking_python(tmp_path, "3.12")), "SETUP_UNAME_S": uname[0],
               "SETUP_UNAME_M": uname[1], "GPU": gpu})
    assert r.returncode == 0, r.stderr
    facts = plan(r.stdout)
    assert facts["backend"] == "torch" and facts["version"] == "3.12" and facts["venv"].endswith("/.venv-torch")
    packages = planned(r.stdout)
    assert {"torch==2.13.0", "numpy==2.2.6", "nibabel==5.3.2", "h5py==3.13.0", "scipy==1.15.3"} <= packages
    assert not any(p.startswith(("tensorflow", "keras")) for p in packages)
    install = next(x for x in r.stdout.splitlines() if x.startswith("PLAN install"))
    assert ("download.pytorch.org/whl/cpu" in install) is (uname[0] == "Linux" and not gpu)
    assert "tensorflow[and-cuda]" not in install


@pytest.mark.parametrize("version, ok", [("3.9", False), ("3.10", True), ("3.13", True), ("3.14", False)])
def test_torch_backend_pythons(tmp_path, version, ok):
    r = setup({"BACKEND": "torch", "PYTHON": str(fake_python(tmp_path, version))})
    if ok:
        assert r.returncode == 0 and plan(r.stdout)["version"] == version, r.stderr
    else:
        assert "the torch environment supports Python 3.10-3.13" in one_error(r)


def test_unknown_backend_is_one_error_line():
    r = setup({"BACKEND": "jax"})
    assert one_error(r) == "[ERR] BACKEND=jax is not a backend: use BACKEND=tf (default) or BACKEND=torch"


def test_torch_requirements_are_pinned_and_numpy_2():
    pins = {Requirement(x.split("#")[0]).name: Requirement(x.split("#")[0]).specifier
            for x in (ROOT / "requirements-torch.txt").read_text().splitlines() if x.split("#")[0].strip()}
    assert all(str(spec).startswith("==") for spec in pins.values()), pins
    assert pins["numpy"].contains("2.2.6") and "tensorflow" not in pins and "torch" in pins
