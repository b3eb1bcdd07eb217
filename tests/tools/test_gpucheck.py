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

from synthseg_native.tools import gpucheck  # noqa: E402

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


BLOCK = ROOT / "tests" / "tools" / "no_tensorflow"  # a sitecustomize that makes tensorflow/keras/nilearn unimportable


def test_gpu_check_without_models_rebuilds_test_weights_without_tensorflow(inputs, tmp_path):
    """The lent GPU machine has no TensorFlow and no nilearn: the run step rebuilds the reference's test weights
    from their recipes (no file over a few hundred kB travels) and runs with both unimportable."""
    ref = tmp_path / "check"
    assert gpucheck.main(["reference", "--image", str(inputs["ras"]), "--out", str(ref), "--modes", "default",
                          "--crop", "64", "--threads", "2", "--copy-image"]) == 0
    carried = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    assert carried == sorted(["recipes/synthseg_2.0.h5.recipe.npz", "ref-default.npz", "reference.json",
                              inputs["ras"].name]), carried
    assert max(p.stat().st_size for p in ref.rglob("*") if p.is_file()) < 2_000_000
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "SYNTHSEG_MODELS"}
    env.update(GPU_CHECK_DIR=str(ref), DEVICE="cpu", PYTHON=sys.executable, SCANS="1", MODES="default",
               PRECISIONS="fp32", OUT=str(out), PYTHONPATH=os.pathsep.join([str(BLOCK), *sys.path]))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "run", "--threads", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "test weights rebuilt from" in proc.stderr + proc.stdout
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert row["voxels_differ"] == 0 and row["max_abs_posterior_diff"] == 0.0  # the very same networks
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                             env=env)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the block is real


def test_gpu_check_usage_error():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("[ERR] usage:")
