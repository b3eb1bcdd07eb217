"""Tiles with overlap for inputs whose network pass does not fit the memory budget (``--max-memory``).

The network's memory grows with the grid it runs on (docs/reliability.md, Memory), and the staged
U-Net already holds no high-resolution tensor of many channels whole. What is left is to run it on
parts of the grid. Each tile goes through the very same per-image path as an untiled run
(segmentation U-Net, flipped pass and average, posterior blur, parcellation); only the QC network,
which scores the whole segmentation, runs once on the stitched result.

Why these rules:

- **Tile sizes are multiples of 32**, like the padded grid preprocessing produces, so a tile is an
  input the network accepts as it accepts an untiled one.
- **Tile origins are multiples of 16**: the U-Net max-pools four times, so a tile that starts on a
  multiple of 2**4 pools the same 2×2×2 cells as the whole grid, and with the grid and the tile both
  multiples of 32 the left-right flipped tile pools the same cells as the flipped grid. Away from its
  borders a tile therefore computes what the untiled network computes there, up to context beyond
  the tile's edge (the U-Net's receptive field is larger than any overlap we can afford).
- **Stitching by centre cropping, no blending**: every voxel is taken from exactly one tile, the one
  in which it lies farthest from a cut edge (the cut is the middle of each overlap), so the stitched
  posteriors are still one network's softmax at every voxel and post-processing sees the same kind
  of input as untiled. With an overlap of ``m`` voxels every kept voxel has at least ``m // 2``
  voxels of real context towards each neighbouring tile. Edges at the border of the grid are not
  cuts: there a tile sees the same zero padding as the untiled run.
- **As few tiles as the budget allows**, then the fewest computed voxels: each tile recomputes its
  overlap, and the fewer seams, the fewer voxels differ from the untiled result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import GRID_STEP, round_up

SIZE_STEP = GRID_STEP  # tile sizes: multiples of 2**5, like the padded grid (preprocess.py)
ORIGIN_STEP = 16   # tile origins: multiples of 2**4, the U-Net's four max-pools stay on the grid's cells
OVERLAP = 64       # least overlap of neighbouring tiles: >= 32 voxels of context at every seam (docs/performance.md)
MIN_TILE = 128     # smallest tile side: upstream's smallest network grid; below it the overlap is most of a tile

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class AxisTiles:
    """Tiles along one axis: all of size ``size``, starting at ``starts``; tile ``i`` supplies ``cuts[i]:cuts[i+1]``."""

    size: int
    starts: tuple[int, ...]
    cuts: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.starts)


@dataclass(frozen=True)
class Tile:
    """One tile: where it is read from the grid, which part of it is kept, and where that part goes."""

    source: tuple[slice, slice, slice]   # the tile in grid coordinates
    keep: tuple[slice, slice, slice]     # the voxels it supplies, in grid coordinates
    local: tuple[slice, slice, slice]    # the same voxels in tile coordinates


@dataclass(frozen=True)
class Tiling:
    grid: Grid
    axes: tuple[AxisTiles, AxisTiles, AxisTiles]
    overlap: int   # the minimum overlap asked for; actual overlaps can be larger

    @property
    def tile_shape(self) -> Grid:
        return (self.axes[0].size, self.axes[1].size, self.axes[2].size)

    @property
    def counts(self) -> Grid:
        return (self.axes[0].n, self.axes[1].n, self.axes[2].n)

    @property
    def n_tiles(self) -> int:
        return math.prod(self.counts)

    @property
    def computed_voxels(self) -> int:
        """Voxels the network runs on, all tiles together (overlaps counted once per tile)."""
        return self.n_tiles * math.prod(self.tile_shape)

    def tiles(self) -> Iterator[Tile]:
        for idx in itertools.product(*(range(a.n) for a in self.axes)):
            source, keep, local = [], [], []
            for axis, i in zip(self.axes, idx):
                s, lo, hi = axis.starts[i], axis.cuts[i], axis.cuts[i + 1]
                source.append(slice(s, s + axis.size))
                keep.append(slice(lo, hi))
                local.append(slice(lo - s, hi - s))
            yield Tile(tuple(source), tuple(keep), tuple(local))  # type: ignore[arg-type]


def axis_tiles(length: int, n: int, overlap: int | None = None, min_tile: int | None = None) -> AxisTiles | None:
    """``n`` equal tiles covering ``length`` voxels with at least ``overlap`` voxels shared by neighbours.

    The tile is the smallest multiple of 32 (at least ``min_tile``) that ``n`` tiles can cover the axis
    with; the space left is spread as evenly as origins on multiples of 16 allow. None when ``n`` tiles
    make no sense on this axis (one tile would already cover it, or some tile would add nothing).
    ``overlap`` and ``min_tile`` default to the module's :data:`OVERLAP` and :data:`MIN_TILE`.
    """
    overlap, min_tile = _defaults(overlap, min_tile)
    if length % SIZE_STEP or overlap % ORIGIN_STEP or overlap < 0 or n < 1:
        raise ValueError(f"axis of {length} voxels, overlap {overlap}: need multiples of {SIZE_STEP} and "
                         f"{ORIGIN_STEP}")
    if n == 1:
        return AxisTiles(length, (0,), (0, length))
    size = max(min_tile, round_up(math.ceil((length + (n - 1) * overlap) / n), SIZE_STEP))
    if size >= length:
        return None
    units = (length - size) // ORIGIN_STEP           # exact: both are multiples of 32
    if units < n - 1:
        return None
    # n - 1 steps of q or q + 1 units; size >= (length + (n-1)·overlap)/n bounds every step by size - overlap
    q, extra = divmod(units, n - 1)
    starts = [0]
    for k in range(n - 1):
        starts.append(starts[-1] + (q + (k < extra)) * ORIGIN_STEP)
    cuts = [0] + [(starts[i + 1] + starts[i] + size) // 2 for i in range(n - 1)] + [length]
    return AxisTiles(size, tuple(starts), tuple(cuts))


def layout(grid: Sequence[int], counts: Sequence[int], overlap: int | None = None,
           min_tile: int | None = None) -> Tiling | None:
    """The tiling with ``counts`` tiles per axis, or None when that count does not fit an axis."""
    overlap, min_tile = _defaults(overlap, min_tile)
    axes = [axis_tiles(int(g), int(n), overlap, min_tile) for g, n in zip(grid, counts)]
    if any(a is None for a in axes):
        return None
    return Tiling((int(grid[0]), int(grid[1]), int(grid[2])), tuple(axes), overlap)  # type: ignore[arg-type]


def candidates(grid: Sequence[int], overlap: int | None = None, min_tile: int | None = None) -> list[Tiling]:
    """Every valid tiling of ``grid``, fewest tiles first, then fewest computed voxels."""
    per_axis = []
    for g in grid:
        counts, last = [], None
        for n in range(1, int(g) // ORIGIN_STEP + 2):
            axis = axis_tiles(int(g), n, overlap, min_tile)
            if axis is not None and (last is None or axis.size < last):  # more tiles of the same size: no gain
                counts.append(n)
                last = axis.size
        per_axis.append(counts)
    found = [layout(grid, c, overlap, min_tile) for c in itertools.product(*per_axis)]
    return sorted((t for t in found if t is not None), key=lambda t: (t.n_tiles, t.computed_voxels, t.counts))


def choose(grid: Sequence[int], need: Callable[[Tiling], float], budget: float, overlap: int | None = None,
           min_tile: int | None = None) -> Tiling | None:
    """The first of :func:`candidates` with more than one tile whose estimated ``need`` fits ``budget``."""
    for tiling in candidates(grid, overlap, min_tile):
        if tiling.n_tiles > 1 and need(tiling) <= budget:
            return tiling
    return None


def smallest(grid: Sequence[int], overlap: int | None = None, min_tile: int | None = None) -> Tiling:
    """The tiling with the smallest tiles (the most per axis): the last resort before refusing an image."""
    return min(candidates(grid, overlap, min_tile), key=lambda t: (math.prod(t.tile_shape), t.n_tiles))


def stitch(image: np.ndarray, tiling: Tiling,
           run: Callable[[np.ndarray], Sequence[np.ndarray | None]]) -> list[np.ndarray | None]:
    """Run ``run`` on every tile of ``image`` (1, X, Y, Z, C) and assemble its outputs on the whole grid.

    ``run`` returns arrays shaped (1, x, y, z, ...) on the tile (or None for an output it does not
    produce); each output voxel is copied from exactly one tile (``Tile.keep``), so nothing is averaged.
    """
    outs: list[np.ndarray | None] | None = None
    for tile in tiling.tiles():
        parts = run(np.ascontiguousarray(image[(slice(None),) + tile.source]))
        if outs is None:
            outs = [None if p is None else np.empty((1,) + tiling.grid + p.shape[4:], dtype=p.dtype) for p in parts]
        for out, part in zip(outs, parts):
            if out is not None and part is not None:
                out[(slice(None),) + tile.keep] = part[(slice(None),) + tile.local]
        del parts
    assert outs is not None
    return outs


def _defaults(overlap: int | None, min_tile: int | None) -> tuple[int, int]:
    """Read at call time, so that a test can change the module's figures."""
    return (OVERLAP if overlap is None else overlap), (MIN_TILE if min_tile is None else min_tile)

