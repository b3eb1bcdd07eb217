"""Will this image fit in memory? Checked from the header, before the voxels are even read.

A scan too large for the machine otherwise ends in the kernel's OOM killer: no message, no
``[ERR]`` line, and the rest of the batch lost with the process. The network's memory grows with
the padded 1 mm grid, which the header alone determines (shape, voxel sizes, ``--crop``), so each
image's need is estimated first and an image that cannot fit is refused with a message that says
how much it needs, how much there is, and that ``--crop`` shrinks the grid.

The estimate is a fit to peak RSS measured with seeded test weights on this project's Linux VM
(2 threads, CPU; see docs/reliability.md): within about ±10 % of the measurements it was fitted to;
more threads, another TensorFlow build or a GPU change the real figure.
It is an estimate, so ``SYNTHSEG_MEMORY_GB`` overrides what the machine reports (``0`` turns the check
off) for the cases where it is wrong: swap that should be used, or a GPU whose memory is separate.

The estimate is compared with a budget: ``--max-memory`` when given, else the memory available to the
process. An image over budget is not refused outright: the network runs on overlapping tiles
(tiling.py), which bounds the network's share of the memory by the tile; what stays proportional to the
whole grid (stitched posteriors, post-processing) is estimated separately. Only an image whose smallest
tiling still does not fit is refused.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import GRID_STEP, round_up
from ..config.sizes import GB, format_size
from ..errors import MemoryShortage
from ..io.images import ImageInfo
from . import architecture as arch
from . import labels as L
from . import machine
from . import tiling as tiling_
from .runtime import DeviceMemory
from .spec import ModelSpec

ENV_OVERRIDE = "SYNTHSEG_MEMORY_GB"
ENV_TILES = "SYNTHSEG_TILES"  # e.g. 2x2x2: tiles per axis regardless of the budget (measurements, docs/performance.md)
# Peak-RSS fit, bytes = base + per_voxel * (padded 1 mm voxels) + the input copies below. Measured with
# /usr/bin/time -v (test weights, CPU, tensorflow 2.15.1 + oneDNN, streamed U-Net of 2026-11-25 evening): default
# 5.76-5.78 GB at 224x256x192 (full MNI152; 2 threads, and 5.77 GB at 1 thread) and 14.27 GB at 320^3 (a 300^3 1 mm
# scan); --fast 5.01 GB at 224x256x192. The base carries 30 MB of margin over the fit.
# Robust runs as one Keras graph and the parcellation figure predates the two-level staging (both measured at
# 160x192x160 and 128^3 on 2026-11-24: 6.05 GB --robust, 5.94 GB --parc): they err on the safe side.
BASE_BYTES = 1.50 * GB
PER_VOXEL = {"default": 371.0, "fast": 303.0, "robust": 1000.0}
PER_VOXEL_PARC = 580.0      # the parcellation U-Net and its posteriors, on top of the segmentation
QC_BYTES = 3.3 * GB         # the QC network on its fixed 224^3 grid
INPUT_COPIES = 3            # float64 input, its blurred copy and the resampled grid during preprocessing
# Tiled runs: each tile costs what an untiled run of the tile's size costs (PER_VOXEL on the tile), and the whole grid
# still holds the stitched posteriors (33 float32), the network input, and post-processing's temporaries, which run on
# the whole grid: bytes per voxel of the whole padded grid. 150 keeps the estimate above every tiled peak measured
# (docs/performance.md, "Tiling for large inputs"): 2026-11-26, 2 threads, streamed U-Net: MNI152 in 6 tiles 3.97 GB
# (estimate 4.72), the 300^3 scan in 64 tiles 6.64 GB (estimate 7.84); earlier, staged U-Net at 1 thread, 2-48
# tiles, 6-19 % under the estimate.
FULL_PER_VOXEL = {"default": 150.0, "fast": 150.0, "robust": 150.0}
FULL_PER_VOXEL_PARC = 290.0  # the stitched parcellation posteriors (69 float32) and their argmax
FULL_PER_VOXEL_QC = 4.0      # the stitched hard decision the QC network scores (int32)


# GPU runs (torch backend on CUDA/MPS): the budget is the device's free memory and the estimate counts what the
# networks hold on the device, from the tensors the slab-streamed U-Net keeps (backends/torch/stream.py): the input
# and its flipped copy, the full-resolution skip (24 float32), the half-resolution one, the posteriors (33 float32)
# and the windows of 32 rows in flight, rounded up by a third. Not a fit: scripts/gpu_check.sh measures the peak
# (docs/performance.md). The parcellation and QC figures are derived from the tensors they hold (below). On a GPU
# that shares the host's memory (Apple silicon) the host's part of the run (posteriors, post-processing) is checked
# against the host's memory too.
DEVICE_BASE_BYTES = 0.6 * GB
DEVICE_PER_VOXEL = {"default": 400.0, "fast": 400.0, "robust": 450.0}


def device_per_voxel_parc() -> float:
    """Device bytes per voxel of the parcellation, from what it holds at once: its input (the image and a two-channel
    one-hot), its full- and half-resolution skips, and its posteriors, all float32 (4 * (3 + 24 + 48/8 + 69))."""
    net = arch.network("parc", L.LabelSet.build(False))
    assert isinstance(net, arch.UNet)
    return 4.0 * (net.c_in + net.features(0) + net.features(1) / 8 + net.n_labels)


def device_qc_bytes() -> float:
    """Device bytes of the QC network on its fixed 224^3 grid, run whole: the one-hot input and the four maps of its
    first level alive at once (two convolutions, the expanded shortcut, their sum), float32."""
    net = arch.network("qc", L.LabelSet.build(False))
    assert isinstance(net, arch.QC)
    return 4.0 * arch.QC_SHAPE ** 3 * (net.n_groups + 4 * net.features(0))


def largest_device_tensor(grid: tuple[int, ...], spec: ModelSpec) -> float:
    """Bytes of the largest single tensor a run holds on the device for a network grid: the posteriors of every
    channel (float32; the parcellation's 69 with --parc), larger than any window of the streamed U-Net and than the
    QC network's maps (1.1 GB at most)."""
    channels = len(L.LabelSet.build(spec.v1).labels)
    if spec.parc:
        channels = max(channels, len(L.parcellation_labels()))
    return 4.0 * math.prod(grid[:3]) * channels


@dataclass
class Estimate:
    grid: tuple[int, int, int]   # padded 1 mm grid the network will see
    need: float                  # bytes, peak for the whole process


@dataclass
class Decision:
    """How an image will run: untiled (``tiling`` None) or in tiles, and the figures behind the choice."""

    estimate: Estimate              # untiled
    budget: float | None            # bytes; None: unknown or unlimited (no check, no tiling)
    where: str                      # where the budget came from
    tiling: tiling_.Tiling | None = None
    tiled_need: float | None = None  # bytes, estimated peak of the tiled run
    forced: bool = False             # the tiles come from $SYNTHSEG_TILES, not from the budget
    tensor_cap: float | None = None  # set when tiles were needed because one device tensor would exceed this


def network_grid(info: ImageInfo, crop: tuple[int, ...] | list[int] | None) -> tuple[int, int, int]:
    """The padded grid preprocessing will produce, from header values (as preprocess.py computes it)."""
    dims = [(s, z) for s, z in zip(info.shape, info.zooms) if s > 1][:3]
    while len(dims) < 3:
        dims.append((1, 1.0))
    shape = [int(math.ceil(s * z)) if abs(z - 1.0) > 0.05 else s for s, z in dims]
    step = GRID_STEP
    if crop is not None:
        shape = [min(s, round_up(c, step)) for s, c in zip(shape, crop)]
    floor = crop if crop is not None else [128, 128, 128]
    return tuple(max(round_up(s, step), round_up(f, step)) for s, f in zip(shape, floor))  # type: ignore


def estimate(info: ImageInfo, spec: ModelSpec, gpu: bool = False) -> Estimate:
    """Peak bytes of an untiled run: of the process (CPU), or on the device (``gpu``)."""
    grid = network_grid(info, spec.crop)
    voxels = float(grid[0] * grid[1] * grid[2])
    mode = _mode(spec)
    if gpu:
        per_voxel = DEVICE_PER_VOXEL[mode] + (device_per_voxel_parc() if spec.parc else 0.0)
        return Estimate(grid, DEVICE_BASE_BYTES + per_voxel * voxels + (device_qc_bytes() if spec.qc else 0.0))
    per_voxel = PER_VOXEL[mode] + (PER_VOXEL_PARC if spec.parc else 0.0)
    need = (BASE_BYTES + per_voxel * voxels + (QC_BYTES if spec.qc else 0.0)
            + _input_bytes(info))
    return Estimate(grid, need)


def tiled_need(info: ImageInfo, tiling: tiling_.Tiling, spec: ModelSpec, gpu: bool = False) -> float:
    """Peak bytes of a run in ``tiling``'s tiles: one tile's network pass plus what the whole grid holds (on a
    GPU only the tile's pass: the stitched results live in host memory)."""
    mode = _mode(spec)
    tile, grid = float(math.prod(tiling.tile_shape)), float(math.prod(tiling.grid))
    if gpu:
        per_voxel = DEVICE_PER_VOXEL[mode] + (device_per_voxel_parc() if spec.parc else 0.0)
        return DEVICE_BASE_BYTES + per_voxel * tile + (device_qc_bytes() if spec.qc else 0.0)
    per_tile = PER_VOXEL[mode] + (PER_VOXEL_PARC if spec.parc else 0.0)
    return (BASE_BYTES + per_tile * tile + _per_grid_voxel(spec) * grid + (QC_BYTES if spec.qc else 0.0)
            + _input_bytes(info))


def beside_bytes(info: ImageInfo, spec: ModelSpec) -> float:
    """Host bytes a scan holds while *another* scan's network runs (a batch overlaps them, ``batch.pipeline``):
    read and prepared before its own network (the input copies), or after it, post-processed and written (what
    stays proportional to its whole grid: the tiled figures' per-grid share, FULL_PER_VOXEL). The larger of the
    two, since a scan is in one role at a time."""
    grid = float(math.prod(network_grid(info, spec.crop)))
    before = _input_bytes(info) + 4.0 * grid
    return max(before, _per_grid_voxel(spec) * grid)


def _input_bytes(info: ImageInfo) -> float:
    """Preprocessing's copies of the input (float64 input, its blurred copy, the resampled grid)."""
    return INPUT_COPIES * 8.0 * math.prod(info.shape)


def _per_grid_voxel(spec: ModelSpec) -> float:
    """Bytes per voxel of the whole padded grid that stay after the network (stitched posteriors, post-processing)."""
    return (FULL_PER_VOXEL[_mode(spec)] + (FULL_PER_VOXEL_PARC if spec.parc else 0.0)
            + (FULL_PER_VOXEL_QC if spec.qc else 0.0))


def _forced_tiles(text: str, grid: tuple[int, int, int]) -> tiling_.Tiling:
    """``$SYNTHSEG_TILES`` (``NxNxN``, tiles per axis) as a tiling of ``grid``; ValueError when it is none."""
    try:
        counts = [int(c) for c in text.lower().split("x")]
    except ValueError:
        counts = []
    tiles = tiling_.layout(grid, counts) if len(counts) == 3 and min(counts) >= 1 else None
    if tiles is None:
        raise ValueError(f"${ENV_TILES}={text!r} is not a tiling of the network grid {'x'.join(map(str, grid))} "
                         f"(tiles per axis as NxNxN; each tile at least {tiling_.MIN_TILE} voxels and smaller "
                         "than the grid along a split axis)")
    return tiles


def _mode(spec: ModelSpec) -> str:
    return "robust" if spec.robust else ("fast" if spec.fast else "default")


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
                ) -> float | None:
    """Bytes the process's cgroup (container, Slurm job) still allows, if it sets a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = root / rel.lstrip("/")
            files = (base / "memory.max", base / "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1
            base = root / "memory" / rel.lstrip("/")
            files = (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, used = (f.read_text().strip() for f in files)
        except OSError:
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            continue
        return float(int(limit) - int(used))
    return None


def available() -> tuple[float | None, str]:
    """Bytes this process may still grow to in total (its current RSS included), and where that came from.

    None means unknown or unlimited (no check). Linux: MemAvailable from /proc/meminfo, lowered to a
    cgroup limit when one is set; elsewhere (macOS): physical memory, which the OS extends by
    compression, so the check there only stops what can never fit.
    """
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        try:
            gb = float(override)
        except ValueError:
            return None, f"${ENV_OVERRIDE}={override!r} is not a number; memory check skipped"
        return (gb * GB if gb > 0 else None), f"${ENV_OVERRIDE}"
    rss = machine.rss()
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        room = float(int(meminfo["MemAvailable"].split()[0]) * 1024)
        where = "available memory"
        cg = cgroup_room()
        if cg is not None and cg < room:
            room, where = cg, "memory left under this job's cgroup limit"
        return rss + room, where
    except (OSError, KeyError, ValueError):
        pass
    physical = machine.physical_memory()
    return (physical, "physical memory") if physical else (None, "unknown")


def budget(max_memory: float | None) -> tuple[float | None, str]:
    """The memory an image may use: ``--max-memory`` when given, else :func:`available`."""
    if max_memory is not None:
        return max_memory, f"--max-memory {format_size(max_memory)}"
    return available()


def host_share(info: ImageInfo, spec: ModelSpec) -> float:
    """Host bytes of a GPU run: the process, the input's copies, and what stays proportional to the whole grid after
    the network (downloaded posteriors, post-processing)."""
    grid = float(math.prod(network_grid(info, spec.crop)))
    return BASE_BYTES + _per_grid_voxel(spec) * grid + _input_bytes(info)


def decide(path: str, info: ImageInfo, spec: ModelSpec, device: DeviceMemory | None = None) -> Decision:
    """Untiled when the estimate fits the budget (``spec.max_memory``, else the memory available), else the fewest
    tiles that fit; :class:`MemoryShortage` when even the smallest tiles do not.

    ``device``: a GPU's memory; the budget is then its free memory (or ``--max-memory``) and the estimate the
    device's share of the run. A GPU that shares the host's memory (``unified``) gets no more than the host has left
    after the run's host share; one with a per-tensor limit (MPS) runs in tiles small enough for its largest tensor.
    """
    gpu = device is not None
    if gpu and spec.max_memory is None:
        assert device is not None
        room, where = device.free, device.where
        if device.unified:
            host, host_where = available()
            if host is not None and (room is None or host - host_share(info, spec) < room):
                room = host - host_share(info, spec)
                where = f"{host_where} less the run's host share, which the GPU shares"
    else:
        room, where = budget(spec.max_memory)
    est = estimate(info, spec, gpu)
    cap = device.tensor_cap if device is not None else None

    def over_cap(grid: tuple[int, ...]) -> bool:
        return cap is not None and largest_device_tensor(grid, spec) > cap

    forced = os.environ.get(ENV_TILES)
    if forced:
        tiles = _forced_tiles(forced, est.grid)
        return Decision(est, room, where, tiles, tiled_need(info, tiles, spec, gpu), forced=True)
    if not over_cap(est.grid) and (room is None or est.need <= room):
        return Decision(est, room, where)

    def need(t: tiling_.Tiling) -> float:
        return math.inf if over_cap(t.tile_shape) else tiled_need(info, t, spec, gpu)

    tiled = tiling_.choose(est.grid, need, sys.float_info.max if room is None else room)  # inf: over the cap
    if tiled is not None:
        return Decision(est, room, where, tiled, need(tiled), tensor_cap=cap if over_cap(est.grid) else None)
    grid = "x".join(map(str, est.grid))
    tiles = ""
    if len(tiling_.candidates(est.grid)) > 1:
        least = tiling_.smallest(est.grid)
        tiles = (f"; about {format_size(tiled_need(info, least, spec, gpu))} even in tiles of "
                 f"{'x'.join(map(str, least.tile_shape))}")
    hint = "use --crop (e.g. --crop 160) to segment a centred patch" if spec.crop is None else "use a smaller --crop"
    if room is None:  # only the per-tensor limit stands in the way
        raise MemoryShortage(f"{path}: its posteriors ({format_size(largest_device_tensor(est.grid, spec))}) exceed "
                             f"the GPU's limit of {format_size(cap or 0)} per tensor even in tiles; {hint}")
    override = "raise --max-memory" if spec.max_memory is not None else f"set {ENV_OVERRIDE} to override this " \
        "estimate (0 turns the check off)"
    raise MemoryShortage(
        f"{path}: needs about {format_size(est.need)} of {'GPU ' if gpu else ''}memory (network grid {grid} at 1 mm"
        f"{tiles}) but only "
        f"{format_size(room)} is available ({where}); {hint}, free memory, or {override}")
