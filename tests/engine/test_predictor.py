"""SynthSeg's routing, written once in engine/predictor.py, held to the same expectations on every backend.

Which posteriors each head sees is what decides agreement with upstream (its one Keras graph picks outputs by
layer name): with the flipped pass both passes are blurred and averaged; with --fast and a head the returned
segmentation is the unblurred softmax while the heads decide on the blurred one; with --parc and --qc the
parcellation is returned unblurred and QC scores the returned segmentation; robust is never blurred; one tile is the
untiled run. Each expectation is written in the protocol's primitives on whole volumes, so it also checks that a
backend's slab-wise streaming, blurring and flip averaging are its whole-volume operations.

The networks are tiny versions of SynthSeg's (two features, three levels) with random weights in files of the
official layout, so the NumPy reference backend runs them in milliseconds; the TensorFlow and PyTorch backends run
the same files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from numpy_backend import NumpyBackend
from synthseg_native.config import Options
from synthseg_native.engine import architecture as arch
from synthseg_native.engine import heads, tiling
from synthseg_native.engine import predictor as engine
from synthseg_native.engine.runtime import Runtime, Timings
from synthseg_native.engine.spec import ModelSpec
from synthseg_native.engine.weights import MODEL_FILES, write_weights

GRID = (40, 8, 8)  # 40 rows: several slabs for every backend (16 in TF, 32 in PyTorch, 4 here)


@dataclass(frozen=True)
class TinyRobust(arch.Robust):
    @property
    def stages(self) -> tuple[arch.UNet, arch.UNet, arch.UNet]:
        return (arch.UNet("unet", 1, self.n_groups, n_features=2, n_levels=3),
                arch.UNet("l2l", self.n_groups, self.n_groups, conv_size=5, n_features=2, n_levels=3, skip_n=1),
                arch.UNet("unet2", 1 + self.n_groups, self.n_labels, n_features=2, n_levels=3))


def tiny(key: str, label_set) -> arch.Network:
    real = REAL_NETWORK(key, label_set)
    if isinstance(real, arch.Robust):
        return TinyRobust(real.n_labels, real.n_groups)
    if isinstance(real, arch.QC):
        return arch.QC(real.n_groups, n_levels=2, conv_size=3, n_features=2)
    return arch.UNet(real.prefix, real.c_in, real.n_labels, n_features=2, n_levels=3)


REAL_NETWORK = arch.network


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Tiny networks in place of SynthSeg's, with seeded random weight files in the official layout."""
    from synthseg_native.engine import labels as L

    monkeypatch.setattr(arch, "network", tiny)
    monkeypatch.setattr(arch, "QC_SHAPE", 8)
    rng = np.random.RandomState(0)
    for key in MODEL_FILES:
        net = tiny(key, L.LabelSet.build(key == "seg1"))
        arrays = {layer: {kind: (rng.uniform(0.5, 1.5, shape) if kind in ("gamma", "moving_variance")
                                 else rng.normal(0, 0.5, shape)).astype(np.float32) for kind, shape in kinds.items()}
                  for layer, kinds in arch.weight_shapes(net).items()}
        write_weights(tmp_path / MODEL_FILES[key], arrays)
    return tmp_path


def backend_named(name: str):
    if name == "numpy":
        return NumpyBackend()
    if name == "tf":
        from synthseg_native.engine.backends.tf.backend import TFBackend

        return TFBackend(Runtime(threads=2, device="CPU", precision="fp32"), "fused")
    pytest.importorskip("torch")
    from synthseg_native.engine.backends.torch.backend import TorchBackend

    return TorchBackend(Runtime(threads=2, device="CPU", precision="fp32", backend="torch", device_kind="cpu"))


BACKENDS = ["numpy", "tf", "torch"]
IMAGE = np.random.RandomState(1).rand(1, *GRID, 1).astype(np.float32)


def predictor(models, backend: str, **flags) -> engine.Predictor:
    spec = ModelSpec.of(Options(models=str(models), backend="tf", **flags))
    return engine.Predictor(spec, backend_named(backend), Timings())


def close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=0, atol=1e-5)


# -- the expectations, in the primitives of the predictor's own backend --------------------------------------------
def whole(p: engine.Predictor, net, image: np.ndarray, blurred: bool):
    b = p.backend
    with b.session():
        out = b.run(net, b.upload(image))
        return b.blur(out) if blurred else out


def parc_of(p: engine.Predictor, seg_post, blurred: bool) -> np.ndarray:
    b = p.backend
    with b.session():
        out = b.run(p.parc, b.parc_input(b.upload(IMAGE), seg_post, p.cortex))
        return b.download(b.blur(out) if blurred else out)


def qc_of(p: engine.Predictor, post) -> np.ndarray:
    with p.backend.session():
        return p.backend.score(p.qc, heads.qc_input(p.backend.decisions(post)[0], p.labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_averages_both_blurred_passes(models, backend):
    p = predictor(models, backend)
    got, parc, qc = p.predict(IMAGE)
    b = p.backend
    first = b.download(whole(p, p.seg, IMAGE, blurred=True))
    second = b.download(whole(p, p.seg, IMAGE[:, ::-1].copy(), blurred=True))
    assert parc is None and qc is None and got.shape == (1, *GRID, len(p.labels.labels))
    close(got, (first + second[:, ::-1][..., p.flip_order]) * np.float32(0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_returns_the_blurred_softmax(models, backend):
    p = predictor(models, backend, fast=True)
    got, _, _ = p.predict(IMAGE)
    close(got, p.backend.download(whole(p, p.seg, IMAGE, blurred=True)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_with_a_parcellation_returns_the_unblurred_segmentation(models, backend):
    p = predictor(models, backend, fast=True, parc=True)
    got, parc, qc = p.predict(IMAGE)
    close(got, p.backend.download(whole(p, p.seg, IMAGE, blurred=False)))
    close(parc, parc_of(p, whole(p, p.seg, IMAGE, blurred=True), blurred=True))  # decided on the blurred one
    assert qc is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_parcellation_and_qc_together(models, backend):
    """The parcellation comes back unblurred, and QC scores the returned (here: averaged) segmentation."""
    p = predictor(models, backend, parc=True, qc=True)
    got, parc, qc = p.predict(IMAGE)
    returned = p.backend.upload(got) if backend == "tf" else _device(p, got)
    close(parc, parc_of(p, returned, blurred=False))
    close(qc, qc_of(p, returned))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_qc_alone_scores_the_blurred_segmentation(models, backend):
    p = predictor(models, backend, fast=True, qc=True)
    got, parc, qc = p.predict(IMAGE)
    close(got, p.backend.download(whole(p, p.seg, IMAGE, blurred=False)))
    assert parc is None
    close(qc, qc_of(p, whole(p, p.seg, IMAGE, blurred=True)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_robust_is_never_blurred(models, backend):
    p = predictor(models, backend, robust=True, parc=True)
    got, parc, _ = p.predict(IMAGE)
    raw = whole(p, p.seg, IMAGE, blurred=False)
    close(got, p.backend.download(raw))
    close(parc, parc_of(p, raw, blurred=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [{}, {"fast": True, "parc": True, "qc": True}])
def test_one_tile_is_the_untiled_run(models, backend, flags):
    p = predictor(models, backend, **flags)
    image = np.random.RandomState(2).rand(1, 32, 32, 32, 1).astype(np.float32)  # tiles: multiples of 32
    untiled = p.predict(image)
    tiled = p.predict_tiled(image, tiling.layout(image.shape[1:4], (1, 1, 1)))
    for a, b in zip(untiled, tiled):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_the_predictor_streams_the_flipped_pass_and_loads_what_the_spec_names(models):
    """On the reference backend the calls themselves are visible: with the flip both passes stream (no whole run),
    the heads are built only when asked for, and the FLOP count covers both passes."""
    p = predictor(models, "numpy")
    assert p.parc is None and p.qc is None and set(p.weight_paths) == {"seg2"}
    p.backend.calls.clear()
    p.predict(IMAGE)
    assert p.backend.calls.count("run_slabs") == 2 and "score" not in p.backend.calls
    fast = predictor(models, "numpy", fast=True, parc=True, qc=True)
    assert set(fast.weight_paths) == {"seg2", "parc", "qc"}
    grid = GRID + (1,)
    assert p.network_flop(grid) == 2 * arch.conv_flops(tiny("seg2", p.labels), GRID)
    assert fast.network_flop(grid) == sum(arch.conv_flops(tiny(k, p.labels), GRID) for k in ("seg2", "parc"))
    assert set(p.weights_digest()) == {"synthseg_2.0.h5"}


def _device(p: engine.Predictor, post: np.ndarray):
    """A downloaded posterior back on the backend, as the backend holds posteriors (torch: channels last)."""
    import torch

    return torch.as_tensor(post) if p.backend.name == "torch" else post
