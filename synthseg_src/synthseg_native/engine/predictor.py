"""SynthSeg's inference, written once over a backend's primitives (:mod:`.backend`); and the one place that picks
and starts a backend.

:class:`Predictor` holds what upstream's ``predict_synthseg`` decides: which networks a run loads and from which
files (digests, the test-weights warning), and which posteriors each head sees. Upstream builds one Keras graph and
picks its outputs by layer name, so the routing has quirks that decide agreement with it, reproduced here (see
:meth:`Predictor.predict`). The networks themselves, the blur and the flip average run in the backend's framework.
Backends are imported only here, and only when a run needs one, so ``import synthseg_native`` and ``--help`` start
neither TensorFlow nor PyTorch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Options
from ..errors import UsageError, WeightsError
from . import architecture as arch
from . import heads, selfcheck, tiling
from . import labels as L
from .backend import Backend, Tensor
from .runtime import DeviceMemory, Runtime, Timings
from .spec import ModelSpec
from .weights import checked as checked_weights
from .weights import file_sha256, is_test_weights, model_files, read_weights

__all__ = ["Predictor", "Runtime", "Timings", "backend_reason", "installed", "label_set", "load", "prepare",
           "resolve_backend", "start"]
logger = logging.getLogger(__name__)

INSTALL_TF = "pip install 'synthseg-native[tf]' (TensorFlow 2.15, Python 3.9-3.11: upstream's bytes on the CPU)"
INSTALL_TORCH = "pip install 'synthseg-native[torch]' (PyTorch: CUDA and Apple GPUs, or the CPU)"
Outputs = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]  # segmentation, parcellation posteriors, QC


class Predictor:
    """SynthSeg's networks, built and loaded once on a backend, then run per image (or per tile)."""

    def __init__(self, spec: ModelSpec, backend: Backend, timings: Timings):
        t0 = time.perf_counter()
        self.spec, self.backend = spec, backend
        self.weight_paths = model_files(spec.networks, spec.models, spec.model_file, spec.freesurfer_first)
        self.labels = label_set(spec, self.weight_paths[spec.model].parent)
        self.architectures = {key: arch.network(key, self.labels) for key in spec.networks}
        built = {key: self._build(key) for key in spec.networks}
        self.seg: Any = built[spec.model]
        self.parc: Any = built.get("parc")
        self.qc: Any = built.get("qc")
        self.flip_order = np.asarray(self.labels.flip, dtype=np.int64) if spec.flip else None
        self.cortex = heads.cortex_lut(self.labels)
        for path in self.weight_paths.values():
            if is_test_weights(path):
                logger.warning(f"{path}: seeded random test weights (synthseg_native.tools.testweights), not the "
                               "official ones: outputs are anatomically meaningless")
        timings.add("load_weights", time.perf_counter() - t0)

    def _build(self, key: str) -> Any:
        path, net = self.weight_paths[key], self.architectures[key]
        return self.backend.build(net, checked_weights(read_weights(path), arch.weight_shapes(net), path))

    # -- what the engine asks ----------------------------------------------------------------------
    def network_flop(self, shape: tuple[int, ...]) -> int:
        """Convolution FLOPs the segmentation (both passes) and parcellation networks spend on one padded input of
        ``shape`` (the QC network and the blur are left out: a small fraction)."""
        grid = tuple(shape[:3])
        total = arch.conv_flops(self.architectures[self.spec.model], grid) * (2 if self.spec.flip else 1)
        if "parc" in self.architectures:
            total += arch.conv_flops(self.architectures["parc"], grid)
        return total

    def device_memory(self) -> DeviceMemory | None:
        """A GPU's free memory and its name (the budget of the next image); None: the host's memory."""
        return self.backend.device_memory()

    def weights_digest(self) -> dict[str, str]:
        """SHA-256 of each weight file loaded, by file name."""
        return {os.path.basename(str(p)): file_sha256(p) for p in self.weight_paths.values()}

    def predict(self, image: np.ndarray) -> Outputs:
        """Segmentation posteriors on the padded grid, (1, X, Y, Z, labels) float32, then the parcellation
        posteriors and QC scores when requested.

        Which tensors upstream returns depends on the heads, because its final Keras model picks outputs by layer
        name: with --parc or --qc and no flip (--fast), the segmentation comes from the softmax layer, i.e. *before*
        the Gaussian blur (the parcellation still sees the blurred one); with --parc and --qc together, the
        parcellation is returned unblurred; the QC network scores the returned segmentation when there is a
        parcellation, else the blurred one.
        """
        b = self.backend
        with b.session():
            x = b.upload(image)
            returned, blurred = self._segment(x)
            post_parc = self._parcellate(x, blurred)
            del x
            qc = None if self.qc is None else self._score(b.decisions(self._qc_post(returned, blurred)))
            return b.download(returned), None if post_parc is None else b.download(post_parc), qc

    def predict_tiled(self, image: np.ndarray, tiles: tiling.Tiling) -> Outputs:
        """:meth:`predict` tile by tile (``--max-memory``): segmentation, flip average, blur and parcellation on each
        tile, stitched by centre cropping (tiling.py); the QC network once, on the stitched hard decision, because
        it scores the whole segmentation."""
        b = self.backend

        def one(tile: np.ndarray) -> Outputs:
            x = b.upload(tile)
            returned, blurred = self._segment(x)
            post_parc = self._parcellate(x, blurred)
            channels = None if self.qc is None else b.decisions(self._qc_post(returned, blurred))
            return b.download(returned), None if post_parc is None else b.download(post_parc), channels

        with b.session():
            returned, post_parc, channels = tiling.stitch(image, tiles, one)
            assert returned is not None
            return returned, post_parc, None if channels is None else self._score(channels)

    # -- SynthSeg's graph --------------------------------------------------------------------------
    def _segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posteriors returned as the segmentation's, and the blurred ones the heads decide on (the same tensor
        except with --fast and a head)."""
        b = self.backend
        if self.spec.robust:  # its cascade ends in the last U-Net's softmax: no smoothing anywhere
            post = b.run(self.seg, x)
            return post, post
        if self.flip_order is None:
            post = b.run(self.seg, x)
            returned = b.copy(post) if self.parc is not None or self.qc is not None else None
            blurred = b.blur(post)
            return (blurred if returned is None else returned), blurred
        # both passes blurred as their slabs leave the network: the flipped pass is never held whole
        blurred = b.assemble(b.blur_slabs(b.run_slabs(self.seg, x)), x)
        post = b.blur_flip_average(blurred, b.run_slabs(self.seg, b.flipped(x)), self.flip_order)
        return post, post

    def _parcellate(self, x: Tensor, blurred: Tensor) -> Tensor | None:
        if self.parc is None:
            return None
        post = self.backend.run(self.parc, self.backend.parc_input(x, blurred, self.cortex))
        return post if self.qc is not None else self.backend.blur(post)

    def _qc_post(self, returned: Tensor, blurred: Tensor) -> Tensor:
        return returned if self.parc is not None else blurred

    def _score(self, channels: np.ndarray) -> np.ndarray:
        """The QC network on the one-hot structure groups of a hard decision (1, X, Y, Z)."""
        return self.backend.score(self.qc, heads.qc_input(channels[0], self.labels))


def label_set(spec: ModelSpec, folder: Path | None = None) -> L.LabelSet:
    """The labels of ``spec``'s segmentation model: upstream's tables (built in), or Photo-SynthSeg's lists from the
    folder of its weights (``folder``; default: where the search order finds them). :class:`WeightsError` when
    Photo-SynthSeg's lists are missing."""
    if spec.photo is None:
        return L.LabelSet.build(spec.v1)
    if folder is None:
        folder = model_files((spec.model,), spec.models, spec.model_file, spec.freesurfer_first)[spec.model].parent
    try:
        return L.LabelSet.photo(folder, spec.photo == "both")
    except FileNotFoundError as exc:
        raise WeightsError(str(exc)) from exc


# -- choosing and starting a backend ----------------------------------------------------------------
def installed(framework: str) -> bool:
    """Whether ``framework`` (``tensorflow``, ``torch``) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(framework) is not None
    except ImportError:  # an import hook that refuses it
        return False


def resolve_backend(opts: Options) -> str:
    """``--backend`` with ``auto`` decided by what is installed: tf where TensorFlow is (upstream's bytes on the
    CPU), else torch; torch also when only it can honour the request (``--device mps``, ``--precision tf32``).
    :class:`UsageError` when nothing that can run the request is installed, naming the extra to add."""
    needs_torch = opts.device == "mps" or opts.precision == "tf32"
    if opts.backend == "tf" or (opts.backend == "auto" and installed("tensorflow") and not needs_torch):
        if not installed("tensorflow"):
            raise UsageError(f"the tf backend needs TensorFlow, which this environment lacks: {INSTALL_TF}; or use "
                             "--backend torch (or auto)")
        return "tf"
    if not installed("torch"):
        if opts.backend == "auto" and not installed("tensorflow"):
            raise UsageError(f"no network backend is installed: {INSTALL_TF}, or {INSTALL_TORCH}")
        why = "the torch backend" if opts.backend == "torch" else f"--device {opts.device} / --precision " \
            f"{opts.precision} (torch backend)"
        raise UsageError(f"{why} needs PyTorch, which this environment lacks: {INSTALL_TORCH}")
    return "torch"


def backend_reason(opts: Options, backend: str) -> str:
    """Why ``--backend auto`` chose ``backend`` (for the first [INFO] line); empty for an explicit choice."""
    if opts.backend != "auto":
        return ""
    if backend == "tf":
        return "--backend auto: TensorFlow is installed"
    if installed("tensorflow"):
        return f"--backend auto: --device {opts.device} and --precision {opts.precision} need PyTorch"
    return "--backend auto: PyTorch is installed, TensorFlow is not"


def prepare(debug: bool = False, backend: str = "tf") -> None:
    """Process settings the backend reads once at import (call before anything imports it)."""
    if backend == "tf":
        from .backends.tf.devices import prepare_tensorflow

        prepare_tensorflow(debug=debug)


def start(spec: ModelSpec) -> Backend:
    """The backend ``spec.backend`` names, started: devices, threads and precision for this process, before its
    first operation (heavy: imports its framework). A GPU is used only after its self-check against the CPU passed
    (``engine.selfcheck``; cached)."""
    if spec.backend == "torch":
        from .backends.torch import backend as torch_backend  # heavy: imports PyTorch

        backend: Backend = torch_backend.start(spec)
    else:
        if not installed("tensorflow"):
            raise UsageError(f"the tf backend needs TensorFlow, which this environment lacks: {INSTALL_TF}; or use "
                             "--backend torch (or auto)")
        from .backends.tf import backend as tf_backend  # heavy: imports TensorFlow

        backend = tf_backend.start(spec)
    if backend.runtime.device_kind == "cpu" or spec.device_check == "off":
        return backend
    if selfcheck.trusted(backend, backend.cpu_twin(), spec.device_check):
        return backend
    return start(replace(spec, device="cpu"))  # --device-check cpu: the GPU failed its check


def load(spec: ModelSpec, timings: Timings, backend: Backend | None = None) -> Predictor:
    """Build and load the networks ``spec`` needs (the expensive step a batch does once), on ``backend`` (started
    for ``spec`` if not given)."""
    return Predictor(spec, backend or start(spec), timings)
