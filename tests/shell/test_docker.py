"""The Docker baseline stage (the pipeline stage with ENGINE=docker) builds one exact `docker run` command line
(mounts that survive spaces and commas, the in-image command, the same flags as the native stage) and says clearly
when Docker is missing or its daemon is down. A fake `docker` on PATH records its argv; no image is run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthseg_native.batch.plan import pipeline_files
from synthseg_native.stage import docker_command

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "scripts" / "40_synthseg_docker.sh"
BASH = shutil.which("bash") or "/bin/bash"
CMD = ["python", "/workspace/SynthSeg/scripts/commands/SynthSeg_predict.py"]
FAKE_DOCKER = f"""#!{BASH}
[[ "$1" == info ]] && exit "${{FAKE_DOCKER_INFO:-0}}"
printf '%s\\0' "$@" > "$FAKE_DOCKER_ARGV"
exit "${{FAKE_DOCKER_RC:-0}}"
"""


@pytest.fixture
def bins(tmp_path: Path) -> dict[str, Path]:
    """`tools`: only the commands the script needs (so a real docker elsewhere on PATH stays out);
    `fake`: a recording docker."""
    tools, fake = tmp_path / "tools", tmp_path / "fake"
    tools.mkdir()
    fake.mkdir()
    for name in ("bash", "dirname"):
        (tools / name).symlink_to(shutil.which(name))
    (fake / "docker").write_text(FAKE_DOCKER)
    (fake / "docker").chmod(0o755)
    return {"tools": tools, "fake": fake}


def baseline(*args: object, path: list[Path], tmp_path: Path,
             **env: object) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the stage with PATH = ``path``; returns the process and the argv the fake docker got."""
    argv_file = tmp_path / "argv"
    argv_file.unlink(missing_ok=True)
    knobs = ("THREADS", "DEVICE", "POSTERIORS", "DATA_ROOT", "SID")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("DOCKER", "SYNTHSEG", "FAKE")) and k not in knobs}
    base.update(PATH=os.pathsep.join(map(str, path)), ENV_FILE=str(tmp_path / "no.env"),
                FAKE_DOCKER_ARGV=str(argv_file), SYNTHSEG_NATIVE=str(ROOT), PYTHON=sys.executable)
    base.update({k: str(v) for k, v in env.items()})
    proc = subprocess.run([BASH, str(STAGE), *map(str, args)], env=base, capture_output=True, text=True,
                          timeout=60, check=False)
    argv = argv_file.read_bytes().decode().split("\0")[:-1] if argv_file.exists() else []
    return proc, argv


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    src = tmp_path / "my scans ü" / "t1 scan.nii.gz"
    src.parent.mkdir()
    src.write_bytes(b"not read by the stage")
    return src


def test_exact_command_line_with_spaces(tmp_path, bins, scan):
    proc, argv = baseline(scan, path=[bins["fake"], bins["tools"]], tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = scan.parent
    assert argv == ["run", "--rm", "--user", f"{os.getuid()}:{os.getgid()}",
                    "--mount", f"type=bind,source={folder},target=/in,readonly",
                    "--mount", f"type=bind,source={folder},target=/out",
                    "pwesp/synthseg:py38", *CMD, "--i", "/in/t1 scan.nii.gz",
                    "--o", "/out/t1 scan_synthseg.nii.gz", "--vol", "/out/t1 scan_synthseg_vols.csv"]
    assert "[INFO] engine:  docker pwesp/synthseg:py38, device: auto" in proc.stdout
    assert "[RUN ] SynthSeg step 40 (Docker baseline)" in proc.stdout and "[DONE] " in proc.stdout


def test_flags_knobs_and_output_folder(tmp_path, bins, scan):
    out = tmp_path / "base, line \"1\""
    proc, argv = baseline(scan, f"{out}/", path=[bins["fake"], bins["tools"]], tmp_path=tmp_path,
                          SYNTHSEG_FLAGS="--parc  --robust", THREADS=4, DEVICE="cpu", POSTERIORS=1,
                          DOCKER_IMAGE="me/synthseg:test", DOCKER_SYNTHSEG_CMD="python3 /opt/predict.py",
                          DOCKER_USER="")
    assert proc.returncode == 0, proc.stderr
    assert out.is_dir()
    assert argv == ["run", "--rm", "--mount", f"type=bind,source={scan.parent},target=/in,readonly",
                    "--mount", f'type=bind,"source={tmp_path}/base, line ""1""",target=/out',
                    "me/synthseg:test", "python3", "/opt/predict.py", "--i", "/in/t1 scan.nii.gz",
                    "--o", "/out/t1 scan_synthseg.nii.gz", "--vol", "/out/t1 scan_synthseg_vols.csv",
                    "--parc", "--robust", "--post", "/out/t1 scan_synthseg_posteriors.nii.gz",
                    "--threads", "4", "--cpu"]


def test_env_mode_gpu_on_apple_silicon(tmp_path, bins):
    src = tmp_path / "data" / "derivatives" / "S1" / "synthsr" / "S1_synthsr.nii.gz"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"")
    (tmp_path / "my.env").write_text(f"DATA_ROOT='{tmp_path / 'data'}'\nSID=S1\nDOCKER_IMAGE=from/env:1\n")
    proc, argv = baseline(path=[bins["fake"], bins["tools"]], tmp_path=tmp_path, ENV_FILE=tmp_path / "my.env",
                          DEVICE="gpu")
    assert proc.returncode == 0, proc.stderr
    seg_dir = tmp_path / "data" / "derivatives" / "S1" / "synthseg"
    assert argv[4:8] == ["--gpus", "all", "--mount", f"type=bind,source={src.parent},target=/in,readonly"]
    assert argv[8:] == ["--mount", f"type=bind,source={seg_dir},target=/out", "from/env:1", *CMD,
                        "--i", "/in/S1_synthsr.nii.gz", "--o", "/out/S1_synthseg.nii.gz",
                        "--vol", "/out/S1_synthseg_vols.csv"]
    # on a Mac with Apple silicon: the amd64 image emulated, and no --user (Docker Desktop maps ownership)
    mac = docker_command(pipeline_files(str(tmp_path / "data"), "S1"), {}, "gpu", [], system="Darwin",
                         machine="arm64")
    assert mac[:7] == ["docker", "run", "--rm", "--platform", "linux/amd64", "--gpus", "all"]


def test_docker_missing(tmp_path, bins, scan):
    proc, argv = baseline(scan, path=[bins["tools"]], tmp_path=tmp_path)
    assert proc.returncode == 1 and not argv
    assert proc.stderr.startswith("[ERR] docker not found")


def test_daemon_not_reachable(tmp_path, bins, scan):
    proc, argv = baseline(scan, path=[bins["fake"], bins["tools"]], tmp_path=tmp_path, FAKE_DOCKER_INFO=1)
    assert proc.returncode == 1 and not argv
    assert "[ERR] the Docker daemon is not reachable ('docker info' failed)" in proc.stderr


def test_container_failure_and_missing_input(tmp_path, bins, scan):
    proc, argv = baseline(scan, path=[bins["fake"], bins["tools"]], tmp_path=tmp_path, FAKE_DOCKER_RC=125)
    assert proc.returncode == 1 and argv
    assert f"[ERR] SynthSeg in Docker failed (exit 125) on {scan}" in proc.stderr
    proc, argv = baseline(tmp_path / "nope.nii.gz", path=[bins["fake"], bins["tools"]], tmp_path=tmp_path)
    assert proc.returncode == 1 and not argv and "[ERR] input not found" in proc.stderr
