"""make doctor reports versions and where the ops ran — on this machine, the CPU."""

from __future__ import annotations

import subprocess
import sys

from synthseg_native import devices


def test_probe_on_cpu():
    where = devices.probe("/CPU:0")
    assert where["Conv3D"].endswith("CPU:0")
    assert where["FusedBatchNormV3 (5-D)"].endswith("CPU:0")


def test_probe_reports_failures_instead_of_crashing():
    where = devices.probe("/GPU:7")  # no such device: TensorFlow falls back or fails; both are reported
    assert "Conv3D" in where and where["Conv3D"]


def test_doctor_output():
    r = subprocess.run([sys.executable, "-m", "synthseg_native.devices"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "tensorflow 2.15.1" in out and "keras 2.15.0" in out
    assert "/CPU:0: Conv3D -> device:CPU:0" in out
    assert "/CPU:0: FusedBatchNormV3 (5-D) -> device:CPU:0" in out
    assert "BatchNorm --bn auto = fused" in out


def test_threads():
    assert devices.configure_threads(2) >= 1
