"""make doctor: every op type of the networks on every device against a float64 reference, and the GPU self-check
(here with the CPU standing in), exiting 1 when a device computes wrong values."""

from __future__ import annotations

import numpy as np
import pytest

from synthseg_native.engine import selfcheck
from synthseg_native.tools import doctor

OPS = ["Conv3D", "MaxPool3D", "UpSampling3D (nearest)", "Concatenate", "ELU", "Softmax", "Argmax/one-hot",
       "BatchNorm (inference)"]


@pytest.fixture(autouse=True)
def small_check(tmp_path, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_CACHE, str(tmp_path / "checks.json"))
    monkeypatch.setattr(selfcheck, "GRID", (32, 64, 64))


def test_every_op_and_the_self_check_on_both_backends(capsys):
    assert doctor.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert f"/CPU:0: {op} -> device:CPU:0, max |diff| vs float64" in out  # TensorFlow
        assert f"  cpu: {op} -> cpu, max |diff| vs float64" in out            # PyTorch
    assert out.count("self-check against the CPU") == 2 and "FAILED" not in out and "WRONG" not in out


def test_a_wrong_op_fails_the_doctor(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    del torch
    from synthseg_native.engine.backends.torch import devices

    real = devices.run_ops

    def wrong(device, inputs):
        found = real(device, inputs)
        out, where = found["MaxPool3D"]
        found["MaxPool3D"] = (out + np.float32(0.5), where)  # a kernel that computes wrong values
        del found["Softmax"]
        found["Softmax"] = (None, "FAILED (NotImplementedError: aten::_softmax not implemented for 'mps')")
        return found

    monkeypatch.setattr(devices, "run_ops", wrong)
    assert doctor.main(["--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "cpu: MaxPool3D -> cpu, max |diff| vs float64 0.5: WRONG" in captured.out
    assert "cpu: Softmax -> FAILED (NotImplementedError" in captured.out
    assert "[ERR] a device failed an op probe or its self-check" in captured.err
