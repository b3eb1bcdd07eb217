"""Trust a GPU only after it computed right: a small streamed U-Net on the GPU and on the CPU, compared.

GPUs have returned wrong numbers without an error: MPS corrupted constant padding of 5-D tensors whose two inner
sizes multiply to 65,536 or more (pytorch#194922), 3-D convolutions were wrong on macOS 26.2 (pytorch#197114), MPS
outputs differ between macOS 15 and 26 for PyTorch 2.8-2.13, tensorflow-metal differs from the CPU
(tensorflow#92686). A segmentation that is silently wrong is the worst outcome this toolkit can have, so before a
run's networks touch a GPU, this check runs SynthSeg's own path — a U-Net streamed in slabs, the posterior blur, the
flipped pass mirrored, channel-swapped and averaged — on a grid with a 256x256 plane, with fixed random weights, on
the GPU and on the CPU, and compares the posteriors (limit :data:`TOLERANCE`). The verdict is cached per device, OS
and framework version (a few seconds, once); ``--device-check`` decides what a failure does: ``error`` (one
``[ERR]``), ``cpu`` (a ``[WARN]``, and the run uses the CPU), ``off`` (no check).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from ..errors import DeviceError
from ..io.atomic import write_text
from . import architecture as arch
from .backend import Backend

logger = logging.getLogger(__name__)

TOLERANCE = 1e-3                      # max |GPU - CPU| of a posterior: float32 rounding stays below 1e-5
GRID = (32, 256, 256)                 # a 256x256 plane, the size at which MPS's 5-D padding broke
NETWORK = arch.UNet("check", 1, 5, n_features=8)
ORDER = np.array([0, 2, 1, 4, 3])     # the flipped pass's channel swap (left/right pairs)
ENV_CACHE = "SYNTHSEG_DEVICE_CHECKS"  # the cache file (default: $XDG_CACHE_HOME/synthseg-native/device-checks.json)


def os_name() -> str:
    """The operating system as a bug report names it: ``macOS 26.2`` or ``Linux-6.1...``."""
    mac = platform.mac_ver()[0]
    return f"macOS {mac}" if mac else platform.platform()


def cache_path() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "synthseg-native" / "device-checks.json"


def key(backend: Backend) -> str:
    """What the verdict depends on: the backend, the device, the OS and the framework's version."""
    r = backend.runtime
    return f"{r.backend} | {r.device} | {os_name()} | {r.framework}"


def weights() -> dict[str, dict[str, np.ndarray]]:
    """Fixed random weights for :data:`NETWORK` (BatchNorm variances positive)."""
    rng = np.random.RandomState(20261207)
    return {layer: {kind: (rng.uniform(0.5, 1.5, shape) if kind in ("gamma", "moving_variance")
                           else rng.normal(0, 0.3, shape)).astype(np.float32) for kind, shape in kinds.items()}
            for layer, kinds in arch.weight_shapes(NETWORK).items()}


def posteriors(backend: Backend) -> np.ndarray:
    """SynthSeg's default path on ``backend``: both passes streamed, blurred, the flipped one mirrored, swapped and
    averaged in."""
    net = backend.build(NETWORK, weights())
    image = np.random.RandomState(7).rand(1, *GRID, 1).astype(np.float32)
    with backend.session():
        x = backend.upload(image)
        post = backend.assemble(backend.blur_slabs(backend.run_slabs(net, x)), x)
        post = backend.blur_flip_average(post, backend.run_slabs(net, backend.flipped(x)), ORDER)
        return backend.download(post)


def difference(backend: Backend, cpu: Backend) -> float:
    """Max |backend - cpu| of the check's posteriors."""
    return float(np.max(np.abs(posteriors(backend).astype(np.float64) - posteriors(cpu))))


def verdict(backend: Backend, cpu: Backend) -> dict:
    """The cached verdict for ``backend``'s device, or a new one (computed and cached)."""
    path, name = cache_path(), key(backend)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(name), dict):
        return cached[name]
    logger.info(f"checking {backend.runtime.device} against the CPU before trusting it (once; cached in {path})")
    diff = difference(backend, cpu)
    found = {"max_abs_diff": diff, "ok": bool(diff <= TOLERANCE), "checked": time.strftime("%Y-%m-%d")}
    cached = cached if isinstance(cached, dict) else {}
    cached[name] = found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(cached, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # a read-only home: check again next time
        logger.warning(f"device check not cached ({exc})")
    return found


def failure(backend: Backend, diff: float) -> str:
    r = backend.runtime
    return (f"{r.device} on {os_name()} with {r.framework} computes wrong values: its posteriors on the device "
            f"self-check differ from the CPU's by up to {diff:.3g} (limit {TOLERANCE:g}). Known causes: macOS 26.2's "
            "Metal convolutions (update macOS), older PyTorch or tensorflow-metal releases (update them); run with "
            "--device cpu, or --device-check cpu to fall back to the CPU with a warning")


def trusted(backend: Backend, cpu: Backend, on_failure: str = "error") -> bool:
    """Whether the run may use ``backend``'s GPU: True when the check passes (or is cached as passed); on failure
    :class:`DeviceError` (``error``), or a warning and False (``cpu``: the caller switches to the CPU)."""
    found = verdict(backend, cpu)
    if found["ok"]:
        return True
    if on_failure == "cpu":
        logger.warning(failure(backend, found["max_abs_diff"]) + "; running on the CPU (--device-check cpu)")
        return False
    raise DeviceError(failure(backend, found["max_abs_diff"]))
