"""The PyTorch backend: its networks against the TF backend's, the slab streaming, devices, and whole runs.

Agreement is float32 rounding, not bits (docs/equivalence.md): the bounds below are those measured on these
inputs with a margin, and tight enough that a wrong layer (a missed BatchNorm, an unswapped flip, a kernel
transposed the wrong way) fails them by orders of magnitude.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synthseg_native.cli import main  # noqa: E402
from synthseg_native.config import Options  # noqa: E402
from synthseg_native.engine import architecture as arch  # noqa: E402
from synthseg_native.engine import memory  # noqa: E402
from synthseg_native.engine.backends.torch import devices, network, stream  # noqa: E402
from synthseg_native.engine.spec import ModelSpec  # noqa: E402
from synthseg_native.engine.weights import MODEL_FILES, read_weights  # noqa: E402
from synthseg_native.errors import UsageError, WeightsError  # noqa: E402

CROP = ["--crop", "64"]


def run(*args: object) -> int:
    return main([str(a) for a in args] + ["--threads", "2"])


def torch_out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        y = model(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    return y.numpy() if y.ndim == 2 else np.moveaxis(y.numpy(), 1, -1)


# -- the streamed U-Net is the whole-volume U-Net -----------------------------------------------------------------
@pytest.mark.parametrize("conv_size,slab,shape", [(3, 16, (64, 32, 32)), (3, 32, (96, 32, 64)), (5, 16, (64, 32, 32))])
def test_stream_equals_whole_pass(conv_size, slab, shape):
    torch.manual_seed(0)
    net = network.UNet(arch.UNet("u", 2, 7, conv_size=conv_size, n_features=4,
                                 skip_n=2 if conv_size == 5 else 0)).eval()
    for bn in net.modules():
        if isinstance(bn, network.BatchNorm):
            bn.gamma.uniform_(0.5, 1.5)
            bn.moving_variance.uniform_(0.5, 2.0)
    x = torch.rand((1, 2) + shape)
    with torch.inference_mode():
        whole = net(x)
        slabs = list(stream.stream(net, x, slab))
    assert [s[0] for s in slabs] == list(range(0, shape[0], slab))
    streamed = stream.assemble(iter(slabs), shape[0])
    # same ops on the same values; oneDNN may pick another kernel for a slab's shape (last-bit differences),
    # a wrong or missing context row costs 1e-2
    assert float((whole - streamed).abs().max()) <= 2e-6


def test_with_context_gives_neighbour_rows():
    x = torch.arange(10.0).reshape(1, 1, 10, 1, 1)
    got = list(stream.with_context(stream.array_slabs(x, 4), rows=2))
    assert [(w[0], w[1]) for w in got] == [(0, 4), (4, 8), (8, 10)]
    assert got[0][2] is None and got[-1][4] is None
    assert got[1][2].flatten().tolist() == [2.0, 3.0] and got[1][4].flatten().tolist() == [8.0, 9.0]


def test_separable_blur_is_upstreams_3d_gaussian():
    """The three 1-D passes against TensorFlow's 27-tap kernel (the TF backend's, upstream's), also at edges."""
    from synthseg_native.engine.backends.tf.blur import blur_kernel

    theirs = blur_kernel(0.5).numpy()[..., 0, 0]
    taps = network.blur_taps(0.5)
    assert len(taps) == 3 and abs(sum(taps) - 1) < 1e-7
    np.testing.assert_allclose(np.einsum("i,j,k->ijk", taps, taps, taps), theirs, rtol=0, atol=2e-7)
    x = torch.rand(1, 4, 9, 7, 5, generator=torch.Generator().manual_seed(0))
    weight = torch.as_tensor(theirs)[None, None].expand(4, 1, -1, -1, -1)
    direct = torch.nn.functional.conv3d(x, weight, padding=1, groups=4)
    assert float((network.blur(x, taps) - direct).abs().max()) < 1e-6
    cl = x.contiguous(memory_format=torch.channels_last_3d)  # the layout the backend runs in on CPU/CUDA
    assert torch.equal(network.blur(cl, taps), network.blur(x, taps))


# -- the networks against the TF backend's, from the same .h5 files --------------------------------------------------
def tf_and_torch(key: str, folder) -> tuple[object, torch.nn.Module]:
    """The same network in both frameworks, from one weights file, as each backend builds it."""
    from synthseg_native.engine import architecture as arch
    from synthseg_native.engine import labels as L
    from synthseg_native.engine.backends.tf import network as tfn
    from synthseg_native.engine.backends.tf.backend import assign
    from synthseg_native.engine.weights import checked

    net = arch.network(key, L.LabelSet.build(key == "seg1"))
    path = folder / MODEL_FILES[key]
    arrays = checked(read_weights(path), arch.weight_shapes(net), path)
    tf_model, torch_model = tfn.keras_model(net), network.module(net)
    assign(tf_model, arrays)
    assert network.load_arrays(torch_model, arrays) == len(arch.weight_shapes(net))
    return tf_model, torch_model.eval()


@pytest.mark.parametrize("key,channels,bound", [("seg2", 1, 2e-4), ("seg1", 1, 2e-4), ("parc", 3, 2e-4),
                                                ("qc", 9, 1e-4)])
def test_network_agrees_with_tensorflow(weights, key, channels, bound):
    folder = weights.need(key)
    tf_model, torch_model = tf_and_torch(key, folder)
    rng = np.random.default_rng(1)
    if key == "qc":
        x = np.eye(channels, dtype=np.float32)[rng.integers(0, channels, (1, 32, 32, 32))]
    elif key == "parc":
        x = np.concatenate([rng.random((1, 32, 32, 64, 1), dtype=np.float32),
                            np.eye(2, dtype=np.float32)[rng.integers(0, 2, (1, 32, 32, 64))]], axis=-1)
    else:
        x = rng.random((1, 32, 32, 64, channels), dtype=np.float32)
    theirs = tf_model.predict(x, verbose=0)
    ours = torch_out(torch_model, x)
    assert ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    assert diff < bound, f"{key}: max |torch - tf| = {diff:.3g}"
    if key != "qc":
        assert (ours.argmax(-1) != theirs.argmax(-1)).mean() < 1e-3


def test_robust_agrees_with_tensorflow_stage_by_stage(weights):
    """SynthSeg-robust is three U-Nets joined by hard decisions (argmax, one-hot). Each U-Net must agree with
    TensorFlow's to float32 rounding when given the same input, TF's own decisions included. The whole cascade
    cannot be held to that bound: where two groups nearly tie (random input and test weights: everywhere), another
    CPU's rounding (AVX2 vs AVX-512) flips a decision and the 5x5x5 convolutions after it spread the change (seen:
    max |diff| 0.25 on an AMD VM with AVX2 only, 0.6 % of the voxels' labels). So the cascade is checked by how
    many labels agree."""
    import tensorflow as tf

    tf_model, torch_model = tf_and_torch("robust", weights.need("robust"))
    x = np.random.default_rng(1).random((1, 32, 32, 64, 1), dtype=np.float32)
    names = ["unet_prediction", "stage1_onehot", "l2l_prediction", "stage2_concat", "unet2_prediction"]
    stages = tf.keras.Model(tf_model.inputs, [tf_model.get_layer(n).output for n in names]).predict(x, verbose=0)
    unet1, onehot1, l2l, joined, final = stages
    for label, torch_net, given, theirs in (("unet", torch_model.unet, x, unet1),
                                            ("l2l", torch_model.l2l, onehot1, l2l),
                                            ("unet2", torch_model.unet2, joined, final)):
        diff = float(np.abs(torch_out(torch_net, given.astype(np.float32)) - theirs).max())
        assert diff < 2e-4, f"robust {label}: max |torch - tf| = {diff:.3g}"
    ours = torch_out(torch_model, x)
    assert ours.shape == final.shape
    assert (ours.argmax(-1) != final.argmax(-1)).mean() < 0.02


def test_misshaped_or_missing_layer_is_named(weights, tmp_path):
    """One check for both backends (engine.weights.checked against the architecture), with the layer's name."""
    from synthseg_native.engine import architecture as arch
    from synthseg_native.engine.weights import checked, write_weights

    arrays = read_weights(weights.need("seg2") / MODEL_FILES["seg2"])
    shapes = arch.weight_shapes(arch.UNet("unet", 1, 33))
    broken = dict(arrays)
    broken["unet_likelihood"] = {"kernel": np.zeros((1, 1, 1, 24, 5), np.float32), "bias": np.zeros(5, np.float32)}
    with pytest.raises(WeightsError, match="unet_likelihood.*kernel has shape"):
        checked(broken, shapes, "w.h5")
    del broken["unet_likelihood"]
    write_weights(tmp_path / "w.h5", broken)
    with pytest.raises(WeightsError, match="layer 'unet_likelihood' is missing"):
        checked(read_weights(tmp_path / "w.h5"), shapes, tmp_path / "w.h5")
    broken = {k: dict(v) for k, v in arrays.items()}
    broken["unet_bn_down_0"]["moving_variance"] = np.full(24, np.nan, np.float32)
    with pytest.raises(WeightsError, match="unet_bn_down_0.*moving_variance has NaN"):
        checked(broken, shapes, "w.h5")


# -- devices, options, memory ----------------------------------------------------------------------------------------
def test_device_choice_and_messages(monkeypatch):
    monkeypatch.setattr(devices, "available", lambda: ["cpu"])
    assert devices.pick("auto") == "cpu" and devices.pick("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible.*available: cpu"):
        devices.pick("cuda")
    monkeypatch.setattr(devices, "available", lambda: ["cuda", "cpu"])
    assert devices.pick("auto") == "cuda"
    assert devices.precision_unsupported("fp16", "cpu") == "PyTorch has no fast float16 Conv3D on CPUs"
    assert "CUDA GPUs only" in devices.precision_unsupported("tf32", "cpu")


def test_start_on_cpu_reports_and_falls_back():
    from synthseg_native.engine.backends.torch.backend import start

    runtime = start(ModelSpec.of(Options(backend="torch", device="cpu", precision="fp16"))).runtime
    assert runtime.backend == "torch" and runtime.device_kind == "cpu" and runtime.precision == "fp32"
    assert runtime.device.startswith("CPU (") and "PyTorch" in runtime.device
    with pytest.raises(UsageError, match="--device cuda"):
        if not torch.cuda.is_available():
            start(ModelSpec.of(Options(backend="torch", device="cuda")))
        else:
            raise UsageError("--device cuda (a GPU is present: nothing to refuse)")


@pytest.mark.parametrize("kwargs,message", [
    ({"backend": "tf", "device": "mps"}, "--device mps needs --backend torch"),
    ({"backend": "tf", "precision": "tf32"}, "tf32 is a torch-backend option"),
    ({"cpu": True, "device": "cuda"}, "--cpu contradicts --device cuda"),
    ({"engine": "upstream", "backend": "torch"}, "native-engine options"),
    ({"backend": "jax"}, "--backend must be one of"),
])
def test_option_conflicts(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Options(**kwargs).check()


def test_cpu_flag_and_device_cpu_are_one_request():
    assert Options(cpu=True).normalised() == Options(device="cpu").normalised()


def test_gpu_budget_tiles_by_device_memory():
    from synthseg_native.engine.runtime import DeviceMemory
    from synthseg_native.io.images import ImageInfo

    info = ImageInfo(shape=(182, 218, 182), zooms=(1.0, 1.0, 1.0), dtype=np.dtype(np.float32))
    spec = ModelSpec.of(Options(backend="torch"))
    roomy = memory.decide("x", info, spec, device=DeviceMemory(80e9, "free memory of cuda:0"))
    assert roomy.tiling is None and roomy.where == "free memory of cuda:0"
    assert roomy.estimate.need < 6e9  # the target of a full 1 mm head on a GPU
    tight = memory.decide("x", info, spec, device=DeviceMemory(2.5e9, "free memory of cuda:0"))
    assert tight.tiling is not None and tight.tiled_need <= 2.5e9
    with pytest.raises(Exception, match="GPU memory"):
        memory.decide("x", info, spec, device=DeviceMemory(0.5e9, "free memory of cuda:0"))


# -- whole runs: torch against tf on real MRI --------------------------------------------------------------------------
def compare_runs(tmp_path, models, image, flags: list[str]) -> dict[str, float]:
    out = {}
    for backend in ("tf", "torch"):
        d = tmp_path / backend
        d.mkdir()
        args = ["--i", image, "--o", d / "seg.nii.gz", "--post", d / "post.nii.gz", "--vol", d / "vol.csv",
                "--models", models, "--backend", backend, *flags]
        if "--qc" in flags:
            args[args.index("--qc") + 1] = d / "qc.csv"
        assert run(*args) == 0
        out[backend] = d
    seg = [np.asanyarray(nib.load(str(out[b] / "seg.nii.gz")).dataobj) for b in ("tf", "torch")]
    post = [np.asanyarray(nib.load(str(out[b] / "post.nii.gz")).dataobj) for b in ("tf", "torch")]
    vols = [np.array(list(csv.reader(open(out[b] / "vol.csv")))[1][1:], dtype=float) for b in ("tf", "torch")]
    delta = np.abs(post[0] - post[1])
    # one voxel decided differently can zero a posterior in post-processing's cleaning (|delta| ~ 1 there): the
    # share of posteriors off by more than 1e-3 says how close the networks are, the max is reported too
    found = {"voxels": float((seg[0] != seg[1]).mean()), "post": float(np.percentile(delta, 99.99)),
             "post_far": float((delta > 1e-3).mean()), "post_max": float(delta.max()),
             "vol": float(np.abs(vols[0] - vols[1]).max())}
    if "--qc" in flags:
        qc = [np.array(list(csv.reader(open(out[b] / "qc.csv")))[1][1:], dtype=float) for b in ("tf", "torch")]
        found["qc"] = float(np.abs(qc[0] - qc[1]).max())
    return found


@pytest.mark.parametrize("flags", [[], ["--fast"], ["--parc", "--qc", "QC"], ["--v1"]])
def test_torch_run_agrees_with_tf(weights, inputs, tmp_path, flags):
    models = weights.need("seg1" if "--v1" in flags else "seg2", *(["parc", "qc"] if "--parc" in flags else []))
    found = compare_runs(tmp_path, models, inputs["ras"], CROP + flags)
    assert found["voxels"] <= 1e-4, found
    assert found["post"] <= 2e-4 and found["post_far"] <= 1e-5, found
    assert found["vol"] <= 2.0, found  # two voxels
    assert found.get("qc", 0.0) <= 2e-3, found


def test_torch_run_in_tiles(weights, inputs, tmp_path, monkeypatch):
    models = weights.need("seg2")
    from synthseg_native.engine import tiling

    monkeypatch.setattr(tiling, "OVERLAP", 32)  # tiles small enough for a test grid, as test_tiling does
    monkeypatch.setattr(tiling, "MIN_TILE", 96)
    monkeypatch.setenv(memory.ENV_TILES, "1x2x1")  # two tiles of 128x96x128 of the 128^3 grid
    found = compare_runs(tmp_path, models, inputs["ras"], ["--fast"])
    assert found["voxels"] <= 1e-4 and found["post"] <= 2e-4 and found["post_far"] <= 1e-5, found


def test_torch_path_imports_no_tensorflow(weights, inputs, tmp_path):
    """The acceptance check of the backend: a whole run, API and files, without TensorFlow in the process."""
    models = weights.need("seg2")
    code = f"""
import json, sys
import synthseg_native as ss
result = ss.segment({str(inputs['ras'])!r}, {str(tmp_path / 'seg.nii.gz')!r}, backend="torch", device="cpu",
                    models={str(models)!r}, crop=64, threads=2, vol={str(tmp_path / 'vol.csv')!r})
print(json.dumps({{"rc": result.exit_code, "tf": sorted(m for m in sys.modules if m.split('.')[0] in
                   ('tensorflow', 'keras'))}}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "tf": []}
    assert "(torch backend)" in proc.stdout and (tmp_path / "seg.nii.gz").is_file()


def test_torch_bf16_on_cpu_runs_and_stays_close(weights, inputs, tmp_path):
    """--precision bf16 through autocast where the CPU has it (else the fallback is what runs: fp32)."""
    from synthseg_native.engine.machine import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no AVX512-BF16/AMX: bf16 falls back to fp32 (tested in test_start_on_cpu...)")
    models = weights.need("seg2")
    runs = {}
    for precision in ("fp32", "bf16"):
        d = tmp_path / precision
        d.mkdir()
        assert run("--i", inputs["ras"], "--o", d / "seg.nii.gz", "--vol", d / "vol.csv", "--models", models,
                   "--backend", "torch", "--device", "cpu", "--precision", precision, *CROP) == 0
        runs[precision] = np.asanyarray(nib.load(str(d / "seg.nii.gz")).dataobj)
    differ = float((runs["fp32"] != runs["bf16"]).mean())
    assert 0.0 < differ < 0.05, differ  # reduced precision really ran (not fp32 again), and is still close


def test_device_out_of_memory_is_a_memory_shortage():
    """CUDA's, MPS's and the CPU allocator's out-of-memory become the engine's MemoryShortage, whose message says
    what to do (--crop, --max-memory); any other error passes through as it is."""
    from synthseg_native.engine.backends.torch.backend import start
    from synthseg_native.errors import MemoryShortage

    backend = start(ModelSpec.of(Options(backend="torch", device="cpu")))
    for raised in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                   RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB)"),
                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")):
        with pytest.raises(MemoryShortage, match=r"^out of memory \(.+\); use --crop .* --max-memory"):
            with backend.session():
                raise raised
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with backend.session():
            raise RuntimeError("shape mismatch")
