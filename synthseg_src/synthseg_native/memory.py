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
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .io import ImageInfo

GB = 1e9
ENV_OVERRIDE = "SYNTHSEG_MEMORY_GB"
N_LEVELS = 5
# Peak-RSS fit, bytes = base + per_voxel * (padded 1 mm voxels) + the input copies below. Measured with
# /usr/bin/time -v (test weights, 2 threads, CPU, tensorflow 2.15.1 + oneDNN, streamed U-Net of 2026-11-25 evening):
# default 5.76 GB at 224x256x192 (full MNI152) and 14.27 GB at 320^3 (a 300^3 1 mm scan); --fast 5.01 GB at 224x256x192.
# Robust runs as one Keras graph and the parcellation figure predates the two-level staging (both measured at
# 160x192x160 and 128^3 on 2026-11-24: 6.05 GB --robust, 5.94 GB --parc): they err on the safe side.
BASE_BYTES = 1.47 * GB
PER_VOXEL = {"default": 371.0, "fast": 303.0, "robust": 1000.0}
PER_VOXEL_PARC = 580.0      # the parcellation U-Net and its posteriors, on top of the segmentation
QC_BYTES = 3.3 * GB         # the QC network on its fixed 224^3 grid
INPUT_COPIES = 3            # float64 input, its blurred copy and the resampled grid during preprocessing


class MemoryShortage(Exception):
    """The estimated need of one image exceeds the memory available; the message says what to do."""


@dataclass
class Estimate:
    grid: tuple[int, int, int]   # padded 1 mm grid the network will see
    need: float                  # bytes, peak for the whole process


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def network_grid(info: ImageInfo, crop: list[int] | None) -> tuple[int, int, int]:
    """The padded grid preprocessing will produce, from header values (as preprocess.py computes it)."""
    dims = [(s, z) for s, z in zip(info.shape, info.zooms) if s > 1][:3]
    while len(dims) < 3:
        dims.append((1, 1.0))
    shape = [int(math.ceil(s * z)) if abs(z - 1.0) > 0.05 else s for s, z in dims]
    step = 2 ** N_LEVELS
    if crop is not None:
        shape = [min(s, _round_up(c, step)) for s, c in zip(shape, crop)]
    floor = crop if crop is not None else [128, 128, 128]
    return tuple(max(_round_up(s, step), _round_up(f, step)) for s, f in zip(shape, floor))  # type: ignore


def estimate(info: ImageInfo, crop: list[int] | None, fast: bool, robust: bool, parc: bool,
             qc: bool = False) -> Estimate:
    grid = network_grid(info, crop)
    voxels = float(grid[0] * grid[1] * grid[2])
    mode = "robust" if robust else ("fast" if fast else "default")
    per_voxel = PER_VOXEL[mode] + (PER_VOXEL_PARC if parc else 0.0)
    need = (BASE_BYTES + per_voxel * voxels + (QC_BYTES if qc else 0.0)
            + INPUT_COPIES * 8.0 * math.prod(info.shape))
    return Estimate(grid, need)


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


def _rss() -> float:
    """This process's resident memory now (it already holds TensorFlow and the weights)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak if sys.platform == "darwin" else peak * 1024)


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
    rss = _rss()
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
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "physical memory"
    except (OSError, ValueError, AttributeError):
        return None, "unknown"


def check(path: str, info: ImageInfo, crop: list[int] | None, fast: bool, robust: bool, parc: bool,
          qc: bool = False) -> None:
    """Raise :class:`MemoryShortage` when the image clearly cannot be segmented in the memory there is."""
    room, where = available()
    if room is None:
        return
    est = estimate(info, crop, fast, robust, parc, qc)
    if est.need <= room:
        return
    grid = "x".join(map(str, est.grid))
    hint = "use --crop (e.g. --crop 160) to segment a centred patch" if crop is None else "use a smaller --crop"
    raise MemoryShortage(
        f"{path}: needs about {est.need / GB:.1f} GB of memory (network grid {grid} at 1 mm) but only "
        f"{room / GB:.1f} GB is available ({where}); {hint}, free memory, or set {ENV_OVERRIDE} to override "
        "this estimate (0 turns the check off)")
