"""Apple GPUs right the first time, checked on Linux: each known MPS / Metal failure has its guard, and each guard a
test here (the parcellation and QC networks' BatchNorm form: tests/engine/test_network.py).

- MPS corrupts constant padding of 5-D tensors with a >= 65,536 inner plane (pytorch#194922): no pad op in the torch
  path (stream.zero_rows and cat), traced below on a 256x256 plane.
- Ops missing on MPS in older PyTorch (max_pool3d, upsample_nearest3d native from 2.8): MPS refused below torch 2.9
  (auto: the CPU, with a warning); the traced ops are all MPS-native.
- CPU fallbacks hidden by PYTORCH_ENABLE_MPS_FALLBACK: a warning at start.
- OS- or version-dependent wrong values (pytorch#197114, tensorflow#92686): engine.selfcheck, GPU against CPU before a
  GPU is trusted.
- MPS per-array limits (2^32 bytes, 2^31 elements; pytorch#149325, #143859): tiles keep the largest device tensor
  below 2^31 bytes.
- Unified memory: budget = min(Metal's working set - its driver's allocation, host available - the run's host share);
  the QC and parcellation figures derived from their tensors; the peak sampled.
"""

from __future__ import annotations

import collections
import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_predictor import models  # noqa: E402, F401  (the tiny networks and their weight files)

from synthseg_native.config import Options  # noqa: E402
from synthseg_native.engine import memory, selfcheck  # noqa: E402
from synthseg_native.engine import predictor as engine  # noqa: E402
from synthseg_native.engine.backends.torch import devices  # noqa: E402
from synthseg_native.engine.backends.torch.backend import TorchBackend  # noqa: E402
from synthseg_native.engine.runtime import DeviceMemory, Runtime, Timings  # noqa: E402
from synthseg_native.engine.spec import ModelSpec  # noqa: E402
from synthseg_native.errors import DeviceError, MemoryShortage  # noqa: E402
from synthseg_native.io.images import ImageInfo  # noqa: E402

# PyTorch ops the predictor may dispatch (as TorchDispatchMode sees them) that run natively on MPS from the floor on.
MPS_NATIVE = {"add", "add_", "alias", "argmax", "batch_norm", "cat", "clone", "contiguous", "conv3d", "copy_",
              "detach", "elu_", "empty", "flip", "index", "index_select", "lift_fresh", "max_pool3d", "mean", "mul",
              "narrow", "one_hot", "permute", "relu", "relu_", "resolve_conj", "resolve_neg", "slice", "softmax",
              "to", "upsample_nearest3d", "view", "zeros", "zeros_like"}
CPU = Runtime(threads=2, device="CPU", precision="fp32", backend="torch", device_kind="cpu", framework="PyTorch")


def traced_ops(models_dir, flags: dict, grid=(32, 256, 256)) -> tuple[collections.Counter, list, set, float]:
    """Every op the torch predictor dispatches on a grid with a 256x256 plane: names, 5-D pads, float64 ops, and the
    largest tensor's bytes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()
            self.pads: list = []
            self.f64: set = set()
            self.largest = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if any(t.dtype == torch.float64 for t in tensors):
                self.f64.add(name)
            if "pad" in name and tensors and tensors[0].dim() == 5:
                self.pads.append(tuple(tensors[0].shape))
            self.largest = max([self.largest] + [t.numel() * t.element_size() for t in tensors])
            return out

    spec = ModelSpec.of(Options(models=str(models_dir), backend="torch", **flags))
    predictor = engine.Predictor(spec, TorchBackend(CPU), Timings())
    image = np.random.RandomState(1).rand(1, *grid, 1).astype(np.float32)
    with Record() as rec:
        predictor.predict(image)
    return rec.ops, rec.pads, rec.f64, rec.largest


@pytest.mark.parametrize("flags", [{}, {"fast": True, "parc": True, "qc": True}, {"robust": True}])
def test_the_torch_path_on_a_256_plane_is_mps_safe(models, flags):  # noqa: F811
    ops, pads, f64, largest = traced_ops(models, flags)
    assert not pads, f"5-D pads (pytorch#194922 corrupts them on MPS): {pads}"
    assert not f64, f"float64 ops (MPS has no float64): {f64}"
    assert set(ops) <= MPS_NATIVE, f"ops outside the MPS-native list: {set(ops) - MPS_NATIVE}"
    assert largest < devices.MPS_TENSOR_CAP


# -- the PyTorch floor, the fallback variable, the macOS minimum ----------------------------------------------------
def test_mps_needs_a_torch_that_runs_every_op_natively(monkeypatch, capsys):
    monkeypatch.setattr(devices, "available", lambda: ["mps", "cpu"])
    monkeypatch.setattr(torch, "__version__", "2.8.1")
    with pytest.raises(ValueError, match=r"--device mps: PyTorch 2.8.1 lacks native MPS kernels .* 'torch>=2.9'"):
        devices.pick("mps")
    assert devices.pick("auto") == "cpu"  # auto is no explicit choice: the CPU, said in a warning
    assert "[WARN] the Apple GPU is not used: PyTorch 2.8.1 lacks" in capsys.readouterr().err
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    assert devices.pick("mps") == "mps" and devices.pick("auto") == "mps"


def test_mps_unavailable_names_the_macos_minimum(monkeypatch):
    monkeypatch.setattr(devices, "available", lambda: ["cpu"])
    with pytest.raises(ValueError, match="needs Apple silicon, macOS 13.2 or newer for 3-D convolutions"):
        devices.pick("mps")


def test_mps_fallback_variable_is_reported(monkeypatch, capsys):
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    devices.warn_about_fallback("mps")
    devices.warn_about_fallback("cpu")
    assert capsys.readouterr().err.count("[WARN] PYTORCH_ENABLE_MPS_FALLBACK is set") == 1


# -- memory on a GPU that shares the host's memory --------------------------------------------------------------------
@pytest.fixture
def mocked_mps(monkeypatch):
    """PyTorch's MPS memory functions as on a 16 GB Mac (recommended working set 10.7 GB, 1 GB held by the driver)."""
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 10.7e9, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 1.0e9, raising=False)
    monkeypatch.setattr(memory, "available", lambda: (12.0e9, "available memory"))
    return devices.free_memory("mps")


def test_mps_budget_is_the_smaller_of_the_device_and_the_host(mocked_mps):
    assert mocked_mps == DeviceMemory(9.7e9, "Metal's recommended working set less what its driver holds",
                                      unified=True, tensor_cap=2.0 ** 31)
    info = ImageInfo(shape=(182, 218, 182), zooms=(1.0, 1.0, 1.0), dtype=np.dtype(np.float32))
    spec = ModelSpec.of(Options(backend="torch", fast=True))
    decision = memory.decide("t1", info, spec, mocked_mps)
    host_room = 12.0e9 - memory.host_share(info, spec)
    assert host_room < 9.7e9 and decision.budget == pytest.approx(host_room)
    assert "less the run's host share" in decision.where


def test_mps_tiles_keep_every_device_tensor_under_its_limit(mocked_mps):
    """Full MNI152 grid: the segmentation's posteriors (33 channels, 1.5 GB) fit under 2^31 bytes, the parcellation's
    (69 channels, 3.0 GB) do not, so --parc runs in tiles on MPS and not on CUDA."""
    info = ImageInfo(shape=(197, 233, 189), zooms=(1.0, 1.0, 1.0), dtype=np.dtype(np.float32))
    roomy = replace(mocked_mps, free=1e12)
    spec = ModelSpec.of(Options(backend="torch"))
    assert memory.largest_device_tensor((224, 256, 192), spec) < 2 ** 31
    assert memory.decide("t1", info, spec, roomy).tiling is None
    parc = replace(spec, parc=True)
    decision = memory.decide("t1", info, parc, roomy)
    assert decision.tiling is not None and decision.tensor_cap == 2 ** 31
    assert memory.largest_device_tensor(decision.tiling.tile_shape, parc) <= 2 ** 31
    cuda = DeviceMemory(1e12, "free memory of cuda:0")
    assert memory.decide("t1", info, parc, cuda).tiling is None  # no per-tensor limit there

    from synthseg_native.engine.segment import tiling_note

    assert "would exceed the GPU's limit of 2.1 GB per tensor" in tiling_note("t1", decision, decision.tiling)


def test_qc_and_parcellation_figures_come_from_the_tensors_they_hold():
    assert memory.device_qc_bytes() == pytest.approx(4 * 224 ** 3 * (9 + 4 * 24))  # 4.7 GB, not the 3.0 assumed
    assert memory.device_per_voxel_parc() == 4 * (3 + 24 + 48 / 8 + 69)


def test_mps_peak_is_sampled_not_read_at_the_end():
    readings = iter([1e9, 3e9, 7e9, 2e9] + [1e9] * 1000)
    sampler = devices.PeakSampler(read=lambda: next(readings), interval=0.001)
    sampler.start()
    import time

    time.sleep(0.05)
    assert sampler.stop() == 7e9  # the end value is 1e9


# -- the value self-check -----------------------------------------------------------------------------------------
class Broken(TorchBackend):
    """A GPU whose flip average is off by a little: what macOS 26.2's convolutions did to MPS results."""

    def blur_flip_average(self, post, flipped, order):
        return super().blur_flip_average(post, flipped, order) + 0.01


@pytest.fixture
def check_cache(tmp_path, monkeypatch):
    """A cache of verdicts of its own, and a smaller check grid (the plumbing is the same; the 256x256 plane matters
    on a real GPU, and the torch path on it is traced above)."""
    path = tmp_path / "device-checks.json"
    monkeypatch.setenv(selfcheck.ENV_CACHE, str(path))
    monkeypatch.setattr(selfcheck, "GRID", (32, 64, 64))
    return path


def test_a_gpu_that_agrees_with_the_cpu_is_trusted_and_cached(check_cache):
    gpu = TorchBackend(replace(CPU, device="GPU standing in"))
    assert selfcheck.difference(gpu, TorchBackend(CPU)) == 0.0
    assert selfcheck.trusted(gpu, TorchBackend(CPU))
    cached = json.loads(check_cache.read_text())
    assert list(cached) == [selfcheck.key(gpu)] and cached[selfcheck.key(gpu)]["ok"] is True
    assert "GPU standing in" in selfcheck.key(gpu) and "PyTorch" in selfcheck.key(gpu)


def test_a_gpu_with_wrong_values_is_refused_or_replaced(check_cache, capsys):
    bad = Broken(replace(CPU, device="mps (Apple GPU, PyTorch 2.13)", framework="PyTorch 2.13.0"))
    with pytest.raises(DeviceError) as err:
        selfcheck.trusted(bad, TorchBackend(CPU))
    text = str(err.value)
    assert text.startswith("mps (Apple GPU, PyTorch 2.13) on ") and "with PyTorch 2.13.0 computes wrong values" in text
    assert "differ from the CPU's by up to 0.01 (limit 0.001)" in text and "--device-check cpu" in text
    capsys.readouterr()
    assert selfcheck.trusted(bad, TorchBackend(CPU), "cpu") is False  # the cached verdict, not a new run
    out = capsys.readouterr()
    assert "running on the CPU (--device-check cpu)" in out.err and "checking" not in out.out


def test_start_switches_to_the_cpu_when_the_check_fails(monkeypatch):
    """engine.start with a GPU that fails its check and --device-check cpu: the run's backend is the CPU's."""
    from synthseg_native.engine.backends.torch import backend as torch_backend

    real = torch_backend.start

    def fake_start(spec):
        started = real(replace(spec, device="cpu"))
        if spec.device == "mps":  # pretend it is a GPU
            started.runtime = replace(started.runtime, device="mps (pretend)", device_kind="mps")
        return started

    monkeypatch.setattr(torch_backend, "start", fake_start)
    monkeypatch.setattr(selfcheck, "trusted", lambda backend, cpu, on_failure: False)
    spec = ModelSpec.of(Options(backend="torch", device="mps", device_check="cpu"))
    assert engine.start(spec).runtime.device_kind == "cpu"
    assert engine.start(replace(spec, device_check="off")).runtime.device_kind == "mps"  # not checked at all


def test_device_check_is_an_option_and_not_part_of_the_result():
    from synthseg_native.batch.provenance import NOT_RESULT_FLAGS
    from synthseg_native.errors import UsageError

    assert "device_check" in NOT_RESULT_FLAGS
    with pytest.raises(UsageError, match="--device_check must be one of error, cpu, off"):
        Options(device_check="maybe").check()


def test_memory_shortage_from_the_per_tensor_limit_alone():
    info = ImageInfo(shape=(512, 512, 512), zooms=(1.0, 1.0, 1.0), dtype=np.dtype(np.float32))
    tiny_cap = DeviceMemory(None, "a GPU", tensor_cap=1e6)
    with pytest.raises(MemoryShortage, match="exceed the GPU's limit of 0.0 GB per tensor even in tiles"):
        memory.decide("big", info, ModelSpec.of(Options(backend="torch")), tiny_cap)
