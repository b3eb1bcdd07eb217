"""What a network backend must provide: the primitives :class:`~synthseg_native.engine.predictor.Predictor` is written
in, and nothing of SynthSeg's rules.

SynthSeg's inference (which networks, which weights, which head sees blurred or unblurred posteriors, the flipped
pass, tiles) is implemented once, in ``engine/predictor.py``. A backend (``backends/tf``, ``backends/torch``) turns
a framework-free :mod:`~synthseg_native.engine.architecture` description into its framework's layers, and runs a
few operations on its own tensors: a U-Net whole or as a stream of slabs, the sigma-0.5 Gaussian blur of
posteriors, the flipped pass's blur-and-average, the hard decision (argmax), the parcellation head's input, the QC
network. Tensors stay the backend's (numpy arrays for TensorFlow's zero-copy path, device tensors for PyTorch)
until :meth:`Backend.download`.

A backend module exposes ``start(spec: ModelSpec) -> Backend`` (devices, threads, precision, before its first
operation). It may import its framework and this protocol's framework-free companions (``architecture``,
``spec``, ``runtime``, ``machine``) only; ``make lint`` holds that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from ..errors import MemoryShortage
from . import architecture as arch
from .runtime import DeviceMemory, Runtime

Tensor = Any                   # the backend's own array type
Slab = tuple[int, int, Any]    # rows [x0, x1) along X of a network output, in the backend's own layout
SIGMA_POSTERIORS = 0.5         # upstream smooths the segmentation posteriors with this Gaussian
ADVICE = ("use --crop (e.g. --crop 160) to segment a smaller centred patch, or --max-memory below what the machine "
          "has (e.g. --max-memory 8G) for smaller tiles")


def out_of_memory(cause: str) -> MemoryShortage:
    """The error a backend raises for its framework's out-of-memory (and the batch for numpy's): the cause, and
    the way out."""
    first = (cause.strip().splitlines() or ["out of memory"])[0]
    return MemoryShortage(f"out of memory ({first}); {ADVICE}")


class Backend(Protocol):
    """The primitives of one framework. Posteriors are (1, X, Y, Z, C) in the backend's layout; an image
    (1, X, Y, Z, channels)."""

    name: str
    runtime: Runtime

    def build(self, net: arch.Network, arrays: dict[str, dict[str, np.ndarray]]) -> Any:
        """``net``'s layers with the checked arrays of its weights file set, in the BatchNorm form and precision
        this backend runs (the QC network stays float32)."""

    def session(self) -> AbstractContextManager[None]:
        """Around one image's work: inference settings, and the framework's out-of-memory turned into
        :func:`out_of_memory`'s :class:`MemoryShortage`."""

    def upload(self, image: np.ndarray) -> Tensor:
        """A float32 numpy image (1, X, Y, Z, C) as the backend's input tensor."""

    def download(self, post: Tensor) -> np.ndarray:
        """Posteriors as a float32 numpy array (1, X, Y, Z, C)."""

    def copy(self, post: Tensor) -> Tensor:
        """An independent copy (before an in-place blur)."""

    def flipped(self, x: Tensor) -> Tensor:
        """The input mirrored along X (the flipped pass)."""

    def run(self, net: Any, x: Tensor) -> Tensor:
        """A built network's output on ``x``, whole (segmentation posteriors: the softmax)."""

    def run_slabs(self, net: Any, x: Tensor) -> Iterator[Slab]:
        """A built U-Net's output as consecutive slabs along X (the full-resolution output never held whole)."""

    def assemble(self, slabs: Iterator[Slab], like: Tensor) -> Tensor:
        """Slabs of an output as one tensor with as many rows as ``like`` (the network's input)."""

    def blur(self, post: Tensor) -> Tensor:
        """Upstream's Gaussian smoothing (sigma 0.5) of every channel; may work in place."""

    def blur_slabs(self, slabs: Iterator[Slab]) -> Iterator[Slab]:
        """:meth:`blur` on a volume that arrives in slabs (each with its neighbours' rows as context)."""

    def blur_flip_average(self, post: Tensor, flipped: Iterator[Slab], order: np.ndarray) -> Tensor:
        """``0.5 * (post + swap(mirror(blur(flipped))))``: the flipped pass, arriving in slabs, blurred, mirrored back,
        its channels put in the order ``order`` (left/right swapped), averaged into ``post`` (in place)."""

    def decisions(self, post: Tensor) -> np.ndarray:
        """The framework's argmax over channels, as int32 numpy (1, X, Y, Z): upstream takes its hard decisions in
        its graph, so the same op picks the same winner where two posteriors tie."""

    def parc_input(self, x: Tensor, post: Tensor, cortex: np.ndarray) -> Tensor:
        """The parcellation network's input: the image, then a one-hot (not cortex, cortex) of
        ``cortex[argmax(post)]`` (``cortex``: 1 for a cortex channel)."""

    def score(self, net: Any, groups: np.ndarray) -> np.ndarray:
        """The QC network on its one-hot structure groups (1, 224, 224, 224, groups), in float32."""

    def device_memory(self) -> DeviceMemory | None:
        """A GPU's memory (an image's budget, whether it is the host's, its per-tensor limit); None: the host's."""

    def cpu_twin(self) -> Backend:
        """The same backend on the CPU, for the device self-check (``engine.selfcheck``); itself when on the CPU."""
