"""make doctor reports versions and where the ops ran — on this machine (no GPU), the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tensorflow as tf

from synthseg_native.engine.backends.tf import devices

NO_GPU = not tf.config.list_physical_devices("GPU")


def test_probe_on_cpu():
    where = devices.probe("/CPU:0")
    assert where["Conv3D"].endswith("CPU:0")
    assert where["FusedBatchNormV3 (5-D)"].endswith("CPU:0")
    assert where["unfused BatchNorm (Rsqrt/Mul/Sub/AddV2)"].endswith("CPU:0")


def test_probe_reports_failures_instead_of_crashing():
    where = devices.probe("/GPU:7")  # no such device: TensorFlow falls back or fails; both are reported
    assert "Conv3D" in where and where["Conv3D"]


def test_keras_layers_use_fused_batchnorm_and_run_on_cpu():
    ops, where = devices.keras_probe("/CPU:0")
    assert {"Conv3D", "FusedBatchNormV3"} <= set(ops)  # what Keras builds for 5-D BatchNorm in inference
    assert where.endswith("CPU:0")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_keras_probe_never_pretends_to_run_on_a_missing_gpu():
    soft = tf.config.get_soft_device_placement()
    ops, where = devices.keras_probe("/GPU:0")
    assert where.startswith("FAILED") and "\n" not in where
    assert tf.config.get_soft_device_placement() == soft  # placement policy restored


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_network_device_is_the_cpu_here():
    assert devices.network_device().startswith("CPU")
    assert devices.is_metal_gpu() is False


def test_doctor_output():
    r = subprocess.run([sys.executable, "-m", "synthseg_native.tools.doctor"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert all(line.startswith("[INFO]") for line in out.splitlines())
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in out
    assert "tensorflow 2.15.1" in out and "keras 2.15.0" in out and "numpy 1.26.4" in out
    assert "nibabel " in out and "h5py " in out
    assert "/CPU:0: Conv3D -> device:CPU:0" in out
    assert "/CPU:0: FusedBatchNormV3 (5-D) -> device:CPU:0" in out
    assert "/CPU:0: keras Conv3D+BatchNormalization" in out and "FusedBatchNormV3) -> device:CPU:0" in out
    if NO_GPU:
        assert "fused 5-D BatchNorm runs on: /CPU:0" in out and "not on" not in out
        assert "network device: CPU" in out
        assert "BatchNorm --bn auto = fused" in out


def test_hide_gpus_in_a_fresh_process():
    code = ("from synthseg_native.engine.backends.tf import devices; devices.hide_gpus(); import os, tensorflow as tf; "
            "print(os.environ['CUDA_VISIBLE_DEVICES'], len(tf.config.get_visible_devices('GPU')), "
            "devices.network_device())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["-1", "0"] and "CPU" in r.stdout


def test_threads():
    assert devices.configure_threads(2) >= 1


def test_cpu_after_tensorflow_started_on_a_gpu_is_pinned(monkeypatch):
    """The self-check's fallback (--device-check cpu) restarts the tf backend with --device cpu after TensorFlow
    initialised its GPUs: they cannot be hidden any more, so the backend pins its work to /CPU:0 and says CPU —
    otherwise the restarted backend would report the GPU and be checked (and fall back) again without end."""
    from synthseg_native.config import Options
    from synthseg_native.engine.backends.tf import backend as tf_backend
    from synthseg_native.engine.spec import ModelSpec

    spec = ModelSpec.of(Options(backend="tf", cpu=True))
    monkeypatch.setattr(devices, "hide_gpus", lambda: False)
    monkeypatch.setattr(devices, "network_device", lambda: "GPU:0 (a GPU that failed its check)")
    pinned = tf_backend.start(spec)
    assert pinned.scope == "/CPU:0" and pinned.runtime.device_kind == "cpu" and pinned.runtime.device.startswith("CPU")
    assert pinned.bn == "fused"
    monkeypatch.setattr(devices, "hide_gpus", lambda: True)
    monkeypatch.setattr(devices, "network_device", devices.cpu_name)
    assert tf_backend.start(spec).scope is None  # hidden as usual: nothing to pin
