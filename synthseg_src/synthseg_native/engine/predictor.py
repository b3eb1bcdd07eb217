"""What the engine needs from a network backend, and the one place that picks and starts it.

A backend builds SynthSeg's networks once (:func:`load`) and then turns padded network inputs into
posteriors (:class:`Predictor`). Everything around it (preprocessing, tiling, post-processing,
writing, batches) is shared and framework-free; the backend is imported only here, and only when a
run needs it, so ``import synthseg_native`` and ``--help`` never start TensorFlow.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..config import Options
from . import labels as L
from . import tiling
from .runtime import Runtime, Timings

__all__ = ["Predictor", "Runtime", "Timings", "load", "prepare", "start"]


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


def prepare(debug: bool = False) -> None:
    """Process settings the backend reads once at import (call before anything imports it)."""
    from .backends.tf.devices import prepare_tensorflow

    prepare_tensorflow(debug=debug)


def start(opts: Options) -> Runtime:
    """Devices and threads for this process, before the backend's first operation."""
    from .backends.tf import predictor as backend  # heavy: imports TensorFlow

    return backend.start(opts)


def load(opts: Options, timings: Timings) -> Predictor:
    """Build and load the networks ``opts`` needs (the expensive step a batch does once)."""
    from .backends.tf import predictor as backend  # heavy: imports TensorFlow

    return backend.TFPredictor(opts, timings)
