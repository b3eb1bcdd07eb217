"""scripts/gpu_check.sh on the CPU: the same script and code path a lent GPU runs, on a small input.

The GPU loan is short and its machine has no internet: the check must not fail on its first real run. Here the
reference step runs in Python and ``gpu_check.sh run`` with DEVICE=cpu, so the script, the wheel-less path, the
timing loop, the comparison and the summary are exercised for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from devtools import gpucheck  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu(weights, inputs, tmp_path):
    models = weights.need("seg2")
    ref = tmp_path / "check"
    assert gpucheck.main(["reference", "--image", str(inputs["ras"]), "--out", str(ref), "--models", str(models),
                          "--modes", "default", "--crop", "64", "--threads", "2", "--copy-image"]) == 0
    assert (ref / "ref-default.npz").is_file() and (ref / inputs["ras"].name).is_file()
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DIR=str(ref), DEVICE="cpu", PYTHON=sys.executable, SCANS="2", MODES="default",
               PRECISIONS="fp32 fp16", SYNTHSEG_MODELS=str(models), OUT=str(out),
               PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "run", "--threads", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    fp32, fp16 = summary["rows"]
    assert fp32["precision_granted"] == "fp32" and len(fp32["batch_scan_s"]) == 2
    assert fp32["voxels_differ"] == 0 and fp32["max_abs_posterior_diff"] == 0.0  # same device, same numbers
    assert fp32["gpu_peak_bytes"] is None and fp32["stages_mean_s"]["network"] > 0
    assert fp16["precision_granted"] == "fp32"  # no fast fp16 on a CPU: the run says so and falls back
    assert "fp16" in proc.stderr and "running in fp32" in proc.stderr
    assert "| default | fp32 |" in (out / "summary.md").read_text()


BLOCK = ROOT / "tests" / "no_tensorflow"  # a sitecustomize that makes tensorflow/keras/nilearn unimportable


def test_gpu_check_prepare_then_run_as_on_the_device(inputs, tmp_path):
    """``prepare`` for real (the nibabel wheel from PyPI), then ``run`` as the lent GPU machine would: TensorFlow,
    Keras and nilearn unimportable, nibabel only from the carried wheel, no weights given (both sides rebuild the
    package's test weights). The carried folder stays small and the run reproduces the CPU reference exactly."""
    ref = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k not in ("SYNTHSEG_MODELS", "PYTHON")}
    env.update(GPU_CHECK_DIR=str(ref), GPU_CHECK_IMAGE=str(inputs["ras"]), MODES="default",
               PYTHONPATH=os.pathsep.join(sys.path))
    prep = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "prepare", "--crop", "64", "--threads",
                           "2"], capture_output=True, text=True, env=env | {"PYTHON": sys.executable}, timeout=900)
    assert prep.returncode == 0, prep.stderr
    carried = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    assert [c for c in carried if not c.startswith("wheels/")] == sorted([
        "ref-default.npz", "reference.json", inputs["ras"].name]), carried
    assert len([c for c in carried if c.startswith("wheels/nibabel-") and c.endswith(".whl")]) == 1, carried
    assert sum(p.stat().st_size for p in ref.rglob("*") if p.is_file()) < 8_000_000
    out = tmp_path / "out"
    device = env | {"DEVICE": "cpu", "PYTHON": sys.executable, "SCANS": "1", "PRECISIONS": "fp32", "OUT": str(out),
                    "PYTHONPATH": os.pathsep.join([str(BLOCK), *sys.path]),
                    "GPU_CHECK_TEST_ONLY_FROM": f"nibabel={ref / 'site'}"}
    blocked = subprocess.run([sys.executable, "-c", "import nibabel"], capture_output=True, text=True, env=device)
    assert blocked.returncode != 0 and "only from" in blocked.stderr  # the block is real
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "run", "--threads", "2"],
                          capture_output=True, text=True, env=device, timeout=900)
    assert proc.returncode == 0, proc.stderr
    log = proc.stderr + proc.stdout
    assert "installing the carried wheels (nibabel)" in log, log
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert row["voxels_differ"] == 0 and row["max_abs_posterior_diff"] == 0.0  # the very same networks


def test_gpu_check_usage_error():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("[ERR] usage:")
