"""--precision: fp32 stays the exact default; bf16 runs where the CPU has AVX512-BF16/AMX and agrees with
fp32 on most voxels; an unsupported precision falls back to fp32 with a warning, never silently."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.cli import main
from synthseg_native.engine import machine
from synthseg_native.engine.backends.tf import devices

CROP = ["--crop", "64"]


def run(*args) -> int:
    return main([str(a) for a in args] + ["--threads", "2"])


def labels_of(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_precision_support_rules(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512f"})
    assert devices.precision_unsupported("fp32") is None
    assert "AVX512-BF16" in devices.precision_unsupported("bf16")
    assert "float16" in devices.precision_unsupported("fp16")
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert devices.precision_unsupported("bf16") is None


def test_unsupported_precision_falls_back_to_exact_fp32(weights, inputs, tmp_path, capsys):
    models = weights.need("seg2")
    a, b = tmp_path / "fp32.nii.gz", tmp_path / "fp16.nii.gz"
    assert run("--i", inputs["ras"], "--o", a, "--models", models, *CROP) == 0
    assert run("--i", inputs["ras"], "--o", b, "--models", models, *CROP, "--precision", "fp16") == 0
    assert "[WARN] --precision fp16: TensorFlow 2.15 has no fast float16 Conv3D on CPUs; running in fp32" \
        in capsys.readouterr().err
    np.testing.assert_array_equal(labels_of(a), labels_of(b))


def test_precision_is_not_an_upstream_flag(tmp_path, capsys):
    rc = run("--i", tmp_path / "x.nii.gz", "--o", tmp_path / "y.nii.gz", "--engine", "upstream",
             "--precision", "bf16")
    assert rc == 2 and "--precision is a native-engine option" in capsys.readouterr().err


@pytest.mark.skipif(devices.precision_unsupported("bf16") is not None, reason="no AVX512-BF16/AMX on this CPU")
def test_bf16_runs_and_mostly_agrees_with_fp32(weights, inputs, tmp_path, capsys):
    models = weights.need("seg2")
    a, b = tmp_path / "fp32.nii.gz", tmp_path / "bf16.nii.gz"
    pa, pb = tmp_path / "fp32_post.nii.gz", tmp_path / "bf16_post.nii.gz"
    assert run("--i", inputs["ras"], "--o", a, "--post", pa, "--models", models, *CROP) == 0
    assert run("--i", inputs["ras"], "--o", b, "--post", pb, "--models", models, *CROP, "--precision", "bf16") == 0
    assert "bf16 (not identical to upstream)" in capsys.readouterr().out
    post = np.asanyarray(nib.load(str(pb)).dataobj)
    assert post.dtype == np.float32
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-3)
    seg_a, seg_b = labels_of(a), labels_of(b)
    assert not np.array_equal(np.asanyarray(nib.load(str(pa)).dataobj), post), "bf16 really ran in bf16"
    assert (seg_a == seg_b).mean() > 0.9
