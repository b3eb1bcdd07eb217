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

__all__ = ["Predictor", "Runtime", "Timings", "backend_reason", "installed", "load", "prepare", "resolve_backend",
           "start"]


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


INSTALL_TF = "pip install 'synthseg-native[tf]' (TensorFlow 2.15, Python 3.9-3.11: upstream's bytes on the CPU)"
INSTALL_TORCH = "pip install 'synthseg-native[torch]' (PyTorch: CUDA and Apple GPUs, or the CPU)"


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


def start(opts: Options) -> Runtime:
    """Devices and threads for this process, before the backend's first operation (``opts.backend`` decided)."""
    if opts.backend == "torch":
        from .backends.torch import predictor as torch_backend  # heavy: imports PyTorch

        return torch_backend.start(opts)
    if not installed("tensorflow"):
        raise UsageError(f"the tf backend needs TensorFlow, which this environment lacks: {INSTALL_TF}; or use "
                         "--backend torch (or auto)")
    from .backends.tf import predictor as tf_backend  # heavy: imports TensorFlow

    return tf_backend.start(opts)


def load(opts: Options, timings: Timings, runtime: Runtime | None = None) -> Predictor:
    """Build and load the networks ``opts`` needs (the expensive step a batch does once), on ``runtime``'s device."""
    if opts.backend == "torch":
        from .backends.torch import predictor as torch_backend  # heavy: imports PyTorch

        return torch_backend.TorchPredictor(opts, timings, runtime or torch_backend.start(opts))
    from .backends.tf import predictor as tf_backend  # heavy: imports TensorFlow

    return tf_backend.TFPredictor(opts, timings)
