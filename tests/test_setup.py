"""make setup: platform detection, interpreter checks, requirement markers, idempotence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup_tf_metal_env.sh"


def setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("GPU", "FORCE", "PYTHON")}
    full.update({"PYTHON": sys.executable, "DRY_RUN": "1"} | env)
    return subprocess.run(["bash", str(SETUP)], env=full, capture_output=True, text=True, timeout=120)


def planned(out: str) -> set[str]:
    return {line.split()[2] for line in out.splitlines() if line.startswith("PLAN package")}


@pytest.mark.parametrize("uname, gpu, flavour, metal", [
    (("Darwin", "arm64"), "", "metal", True),
    (("Darwin", "x86_64"), "", "cpu", False),
    (("Linux", "x86_64"), "", "cpu", False),
    (("Linux", "aarch64"), "", "cpu", False),
    (("Linux", "x86_64"), "cuda", "cuda", False),
])
def test_platform_plan(uname, gpu, flavour, metal):
    r = setup({"SETUP_UNAME_S": uname[0], "SETUP_UNAME_M": uname[1], "GPU": gpu})
    assert r.returncode == 0, r.stderr
    assert f"flavour={flavour}" in r.stdout
    packages = planned(r.stdout)
    assert "tensorflow==2.15.1" in packages and "keras==2.15.0" in packages and "numpy==1.26.4" in packages
    assert ("tensorflow-metal==1.1.0" in packages) is metal
    assert ("tensorflow[and-cuda]==2.15.1" in r.stdout) is (flavour == "cuda")


@pytest.mark.parametrize("uname, gpu", [(("FreeBSD", "amd64"), ""), (("Linux", "riscv64"), ""),
                                        (("Darwin", "arm64"), "cuda")])
def test_unsupported_platform_is_one_error_line(uname, gpu):
    r = setup({"SETUP_UNAME_S": uname[0], "SETUP_UNAME_M": uname[1], "GPU": gpu})
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("[ERR]")]
    assert len(errors) == 1 and r.stdout == ""


def test_python_that_does_not_run():
    r = setup({"PYTHON": "/usr/bin/false"})
    assert r.returncode != 0
    assert r.stderr.strip().startswith("[ERR]") and len(r.stderr.strip().splitlines()) == 1
    assert "3.9-3.11" in r.stderr


def test_python_too_new(tmp_path):
    fake = tmp_path / "python3.12"
    fake.write_text('#!/bin/sh\necho 3.12\n')
    fake.chmod(0o755)
    r = setup({"PYTHON": str(fake)})
    assert r.returncode != 0
    assert "Python 3.12" in r.stderr and r.stderr.count("[ERR]") == 1


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
    assert {"tensorflow", "keras", "numpy", "h5py", "nibabel", "scipy"} <= active
    assert ("tensorflow-metal" in active) is metal


def test_second_setup_is_a_no_op():
    """The environment the tests run in was built by make setup; a second run only reports."""
    venv = Path(sys.prefix)
    if not (venv / ".setup-stamp").is_file():
        pytest.skip("not running inside a make setup environment")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE", "DRY_RUN", "GPU")}
    env.update(VENV=str(venv), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[SKIP]" in r.stdout and "[RUN ]" not in r.stdout
    assert "FusedBatchNormV3" in r.stdout
