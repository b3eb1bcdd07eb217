"""What the engine needs from a network backend, and the one place that picks and starts it.

A backend builds SynthSeg's networks once (:func:`load`) and then turns padded network inputs into
posteriors (:class:`Predictor`). Everything around it (preprocessing, tiling, post-processing,
writing, batches) is shared and framework-free; the backend is imported only here, and only when a
run needs it, so ``import synthseg_native`` and ``--help`` never start TensorFlow or PyTorch. Two backends exist:
``backends/tf`` (the default, upstream's bits on the CPU) and ``backends/torch`` (CUDA, MPS, CPU; no TensorFlow).
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import numpy as np

from ..config import Options
from ..errors import UsageError
from . import labels as L
from . import tiling
from .runtime import Runtime, Timings

__all__ = ["Predictor", "Runtime", "Timings", "load", "prepare", "resolve_backend", "start"]


class Predictor(Protocol):
    """A backend's loaded networks (``backends/<name>/predictor.py``)."""

    labels: L.LabelSet
    weight_paths: dict[str, object]

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Segmentation posteriors (1, X, Y, Z, labels), parcellation posteriors, QC scores."""

    def predict_tiled(self, image: np.ndarray, tiles: tiling.Tiling
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`predict` on overlapping tiles, stitched."""

    def network_flop(self, shape: tuple[int, ...]) -> int:
        """Convolution FLOPs spent on one padded input of ``shape`` (for --profile)."""

    def weights_digest(self) -> dict[str, str]:
        """SHA-256 of each weight file loaded, by file name."""

    def device_memory(self) -> tuple[float | None, str] | None:
        """A GPU's free memory now and its name (the memory budget of an image); None: host memory."""


def resolve_backend(opts: Options) -> str:
    """``--backend`` with ``auto`` decided: torch when PyTorch is installed and sees a CUDA or MPS GPU (and
    ``--cpu`` / ``--device cpu`` do not forbid it), else tf, whose CPU result is upstream's bytes."""
    if opts.backend != "auto":
        return opts.backend
    if opts.cpu or opts.device == "cpu":
        return "tf"
    try:
        from .backends.torch import devices  # heavy: imports PyTorch
    except ImportError:
        return "tf"
    return "torch" if devices.available()[0] != "cpu" else "tf"


def prepare(debug: bool = False, backend: str = "tf") -> None:
    """Process settings the backend reads once at import (call before anything imports it)."""
    if backend == "tf":
        from .backends.tf.devices import prepare_tensorflow

        prepare_tensorflow(debug=debug)


def start(opts: Options) -> Runtime:
    """Devices and threads for this process, before the backend's first operation (``opts.backend`` decided)."""
    if opts.backend == "torch":
        from .backends.torch import predictor as torch_backend  # heavy: imports PyTorch

        return torch_backend.start(opts)
    if importlib.util.find_spec("tensorflow") is None:
        raise UsageError("the tf backend needs TensorFlow, which this environment lacks (built with "
                         "BACKEND=torch, or Python >= 3.12): add --backend torch")
    from .backends.tf import predictor as tf_backend  # heavy: imports TensorFlow

    return tf_backend.start(opts)


def load(opts: Options, timings: Timings, runtime: Runtime | None = None) -> Predictor:
    """Build and load the networks ``opts`` needs (the expensive step a batch does once), on ``runtime``'s device."""
    if opts.backend == "torch":
        from .backends.torch import predictor as torch_backend  # heavy: imports PyTorch

        return torch_backend.TorchPredictor(opts, timings, runtime or torch_backend.start(opts))
    from .backends.tf import predictor as tf_backend  # heavy: imports TensorFlow

    return tf_backend.TFPredictor(opts, timings)
