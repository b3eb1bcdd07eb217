"""Tiling for large inputs (--max-memory): tile plans, stitching, the tiled network path and the flag.

The plans are checked exhaustively on small grids (pure numpy); the network runs on small crops of
the MNI152 T1 with seeded test weights. For the end-to-end runs the memory model's constant terms are
zeroed, so that a budget in megabytes forces tiles on a 128³ test grid (the real constants would need a
300³ scan to make tiling pay off); what is tested is the mechanism, not the fitted figures.
"""

from __future__ import annotations

import itertools
import re

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.cli import main
from synthseg_native.config import parse_size
from synthseg_native.engine import memory, tiling

GRIDS = [(128, 128, 128), (160, 192, 160), (224, 256, 192), (320, 320, 320), (128, 352, 96)]


def err_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[ERR]")]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = [x for x in np.union1d(np.unique(a), np.unique(b)) if x != 0]
    return float(np.mean([2 * np.sum((a == x) & (b == x)) / (np.sum(a == x) + np.sum(b == x)) for x in labels]))


# ------------------------------------------------------------------------------------------- tile plans


@pytest.mark.parametrize("length", [96, 128, 160, 192, 224, 256, 320, 352])
@pytest.mark.parametrize("overlap", [0, 16, 32, 48, 64])
def test_axis_tiles_cover_the_axis_with_the_overlap_asked_for(length, overlap):
    for n in range(1, length // tiling.ORIGIN_STEP + 2):
        axis = tiling.axis_tiles(length, n, overlap)
        if axis is None:
            continue
        assert axis.n == n and axis.size % 32 == 0 and all(s % 16 == 0 for s in axis.starts)
        assert axis.starts[0] == 0 and axis.starts[-1] + axis.size == length
        assert n == 1 or axis.size >= tiling.MIN_TILE
        for i in range(n - 1):
            shared = axis.starts[i] + axis.size - axis.starts[i + 1]
            assert shared >= overlap, (axis, i)
            # the cut between tile i and i + 1 lies in the middle of what they share
            assert axis.cuts[i + 1] - axis.starts[i + 1] >= shared // 2
            assert axis.starts[i] + axis.size - axis.cuts[i + 1] >= shared // 2
        assert axis.cuts[0] == 0 and axis.cuts[-1] == length and list(axis.cuts) == sorted(set(axis.cuts))


def test_a_count_that_adds_nothing_is_not_a_plan():
    assert tiling.axis_tiles(128, 1).size == 128
    assert tiling.axis_tiles(96, 2) is None                  # one tile of the minimum size covers it already
    assert tiling.axis_tiles(128, 4) is None                 # 4 tiles of 96 on 128: steps of 0 voxels
    with pytest.raises(ValueError):
        tiling.axis_tiles(100, 2)                            # not a grid the network accepts


@pytest.mark.parametrize("grid, overlap, min_tile", [
    ((128, 128, 128), 32, 64), ((160, 128, 96), 16, 64), ((96, 192, 160), 32, 96), ((160, 192, 224), 64, 128),
])
def test_stitching_takes_every_voxel_exactly_once_from_the_tile_where_it_is_farthest_from_a_cut(grid, overlap,
                                                                                                min_tile):
    for counts in itertools.product(range(1, 4), repeat=3):
        plan = tiling.layout(grid, counts, overlap, min_tile)
        if plan is None:
            continue
        count = np.zeros(grid, dtype=np.int32)
        for tile in plan.tiles():
            count[tile.keep] += 1
            # the kept part lies inside the tile, at the same place
            assert all(k.start - s.start == loc.start and k.stop - s.start == loc.stop
                       for k, s, loc in zip(tile.keep, tile.source, tile.local))
        assert np.all(count == 1), counts
        # each voxel's distance to the nearest cut edge (grid borders are not cuts) is the largest over the
        # tiles that contain it
        best = np.zeros(grid, dtype=np.int32)
        got = np.zeros(grid, dtype=np.int32)
        for tile in plan.tiles():
            dist = _cut_distance(tile.source, grid)
            np.maximum(best[tile.source], dist, out=best[tile.source])
            got[tile.keep] = dist[tile.local]
        np.testing.assert_array_equal(got, best, err_msg=str(counts))
        if plan.n_tiles > 1:
            assert got.min() >= overlap // 2  # every seam has half the overlap of context on each side


def _cut_distance(source: tuple[slice, ...], grid: tuple[int, ...]) -> np.ndarray:
    """Distance of every voxel of a tile to its nearest edge that is not a border of the grid."""
    dist = np.full(tuple(s.stop - s.start for s in source), 10 ** 6, dtype=np.int32)
    for axis, (s, g) in enumerate(zip(source, grid)):
        pos = np.arange(s.stop - s.start)
        d = np.full(pos.shape, 10 ** 6)
        if s.start > 0:
            d = np.minimum(d, pos)
        if s.stop < g:
            d = np.minimum(d, s.stop - s.start - 1 - pos)
        shape = [1, 1, 1]
        shape[axis] = -1
        dist = np.minimum(dist, d.reshape(shape))
    return dist


def test_stitch_reassembles_the_input_exactly():
    grid = (128, 160, 128)
    image = np.random.RandomState(0).rand(1, *grid, 1).astype(np.float32)
    plan = tiling.layout(grid, (2, 2, 2), overlap=32, min_tile=96)
    seen = []

    def run(tile):
        seen.append(tile.shape)
        return tile * 2, None, tile[..., 0].astype(np.int32)

    doubled, nothing, ints = tiling.stitch(image, plan, run)
    assert len(seen) == 8 and all(s == (1, *plan.tile_shape, 1) for s in seen)
    np.testing.assert_array_equal(doubled, image * 2)
    assert nothing is None and ints.shape == (1, *grid) and ints.dtype == np.int32


@pytest.mark.parametrize("grid", GRIDS)
def test_candidates_are_ordered_and_choose_takes_the_fewest_tiles_that_fit(grid):
    plans = tiling.candidates(grid)
    assert plans[0].n_tiles == 1 and plans[0].tile_shape == grid
    keys = [(p.n_tiles, p.computed_voxels) for p in plans]
    assert keys == sorted(keys)
    smallest = tiling.smallest(grid)
    assert all(t == min(tiling.MIN_TILE, g) or t == g for t, g in zip(smallest.tile_shape, grid)) or \
        np.prod(smallest.tile_shape) == min(np.prod(p.tile_shape) for p in plans)
    voxels = lambda p: float(np.prod(p.tile_shape))  # noqa: E731
    for budget in (np.prod(grid) * 0.9, np.prod(grid) * 0.5, np.prod(grid) * 0.3):
        chosen = tiling.choose(grid, voxels, budget)
        fits = [p for p in plans if p.n_tiles > 1 and voxels(p) <= budget]
        if not fits:
            assert chosen is None
            continue
        assert chosen is not None and voxels(chosen) <= budget
        assert chosen.n_tiles == min(p.n_tiles for p in fits)
    assert tiling.choose(grid, voxels, 1.0) is None


# ----------------------------------------------------------------------------------------- --max-memory


@pytest.mark.parametrize("text, value", [
    ("8G", 8e9), ("8GB", 8e9), ("8gb", 8e9), ("8000M", 8e9), ("12.5G", 12.5e9), ("8GiB", 8 * 2 ** 30),
    ("500MB", 5e8), ("1T", 1e12), ("auto", None), ("AUTO", None),
])
def test_max_memory_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["8", "8X", "-1G", "0G", "G", "eight", "8 GG", "nanG", "infG", ""])
def test_bad_max_memory_is_a_usage_error(bad, tmp_path, capsys):
    assert main(["--i", str(tmp_path / "in.nii.gz"), "--o", str(tmp_path / "o.nii.gz"), f"--max-memory={bad}"]) == 2
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--max-memory" in err[0] and f"invalid size {bad!r}" in err[0], err
    assert "e.g. 8G, 8GB, 8000M, 12.5G" in err[0]


def test_max_memory_needs_the_native_engine(tmp_path, capsys):
    assert main(["--i", str(tmp_path / "in.nii.gz"), "--o", str(tmp_path / "o.nii.gz"), "--engine", "upstream",
                 "--max-memory", "8G"]) == 2
    assert "--max-memory is a native-engine option" in capsys.readouterr().err


def test_budget_decides_between_untiled_tiles_and_refusal():
    from dataclasses import replace

    from synthseg_native.config import Options
    from synthseg_native.engine.spec import ModelSpec

    info = memory.ImageInfo((300, 300, 300), (1.0, 1.0, 1.0), np.dtype("f4"))
    spec = ModelSpec.of(Options(backend="tf"))

    def budget(nbytes: float) -> ModelSpec:
        return replace(spec, max_memory=nbytes)

    est = memory.estimate(info, spec)
    assert est.grid == (320, 320, 320)
    assert memory.decide("x", info, budget(est.need + 1)).tiling is None
    d = memory.decide("x", info, budget(est.need - 1))
    assert d.tiling is not None and d.tiling.n_tiles > 1 and d.tiled_need <= est.need - 1
    floor = memory.tiled_need(info, tiling.smallest(est.grid), spec)
    least = "x".join([str(tiling.MIN_TILE)] * 3)
    with pytest.raises(memory.MemoryShortage, match=rf"even in tiles of {least}\) but only .* \(--max-memory "):
        memory.decide("x", info, budget(floor - 1))
    for room in (8e9, 10e9, 12e9):  # more room, fewer tiles
        d = memory.decide("x", info, budget(room))
        assert d.tiled_need is not None and d.tiled_need <= room
    tiles = [memory.decide("x", info, budget(b)).tiling.n_tiles for b in (8e9, 12e9)]
    assert tiles[0] > tiles[1]


# ------------------------------------------------------------------------------------- the network path


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles on a 128³ test grid: the memory model without its constant terms, and pinned tile figures.

    With the real constants a 128³ grid never pays off to tile (the whole grid's share dominates), so a
    budget could not force tiles on an input small enough for a test.
    """
    monkeypatch.setattr(memory, "BASE_BYTES", 0.0)
    monkeypatch.setattr(memory, "QC_BYTES", 0.0)
    monkeypatch.setattr(memory, "INPUT_COPIES", 0)
    monkeypatch.setattr(memory, "FULL_PER_VOXEL", {k: 0.0 for k in memory.FULL_PER_VOXEL})
    monkeypatch.setattr(memory, "FULL_PER_VOXEL_PARC", 0.0)
    monkeypatch.setattr(memory, "FULL_PER_VOXEL_QC", 0.0)
    monkeypatch.setattr(tiling, "OVERLAP", 32)
    monkeypatch.setattr(tiling, "MIN_TILE", 96)


def _prepared(path, crop: int | None = None):
    from synthseg_native.engine.preprocess import preprocess
    from synthseg_native.io.images import load_image

    size = None if crop is None else [crop] * 3
    return preprocess(load_image(path), str(path), crop=size, min_pad=size)


def _predictor(models, **flags):
    from synthseg_native.config import Options
    from synthseg_native.engine import predictor
    from synthseg_native.engine.spec import ModelSpec

    return predictor.load(ModelSpec.of(Options(i="x", o="y", models=str(models), backend="tf", **flags)),
                          predictor.Timings())


@pytest.mark.parametrize("flags", [dict(parc=True, qc="qc.csv"), dict(fast=True, parc=True), dict(robust=True)],
                         ids=["parc-qc", "fast-parc", "robust"])
def test_one_tile_is_bit_identical_to_the_untiled_path(weights, inputs, flags):
    """The stitching code itself, fed one tile covering the grid, changes no bit (QC input included).

    --fast with a head is the case where the returned posteriors (unblurred) and the ones the heads
    decide on (blurred) differ."""
    models = weights.need("robust" if flags.get("robust") else "seg2", "parc", "qc")
    pred = _predictor(models, **flags)
    if pred.qc is not None:  # compare what the QC network is given (224³, slow) instead of its scores
        pred.backend.score = lambda net, groups: groups.copy()
    image = _prepared(inputs["ras"], crop=64).image
    whole = pred.predict(image)
    one = pred.predict_tiled(image, tiling.layout(image.shape[1:4], (1, 1, 1)))
    for a, b in zip(whole, one):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_stitched_posteriors_agree_with_the_untiled_run_and_overlap_matters(weights, inputs):
    """Agreement of the network's hard decision inside the image, tiled vs untiled.

    The seeded test weights make an unusually context-hungry network (its output changes up to ~90
    voxels from a tile's cut edge, docs/performance.md), and on a 128³ grid every voxel is near a seam,
    so the figures are low; what they show is that the overlap does its job: the threshold sits between
    the measured agreement with overlapping tiles (0.79-0.82 over the three axes) and without overlap
    (0.51-0.56).
    """
    prep = _prepared(inputs["ras"])
    pred = _predictor(weights.need("seg2"))
    p = prep.pad_idx
    inside = (0, slice(p[0], p[3]), slice(p[1], p[4]), slice(p[2], p[5]))
    ref = pred.predict(prep.image)[0].argmax(-1)[inside]
    grid = prep.image.shape[1:4]
    good = tiling.layout(grid, (1, 1, 2), overlap=32, min_tile=96)     # 96-voxel tiles at 0 and 32
    bare = tiling.layout(grid, (1, 1, 2), overlap=0, min_tile=64)      # 64-voxel tiles side by side
    assert good.n_tiles == bare.n_tiles == 2
    with_overlap = agreement(pred.predict_tiled(prep.image, good)[0].argmax(-1)[inside], ref)
    without = agreement(pred.predict_tiled(prep.image, bare)[0].argmax(-1)[inside], ref)
    assert with_overlap >= 0.75 > 0.65 > without, (with_overlap, without)


def _seg(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _info(out: str) -> list[str]:
    return [line for line in out.splitlines() if "segmenting in" in line]


def test_forced_small_budget_tiles_with_one_warning_and_agrees(weights, inputs, tmp_path, capsys, small_tiles):
    models = weights.need("seg2")
    whole, tiled = tmp_path / "whole.nii.gz", tmp_path / "tiled.nii.gz"
    assert main(["--i", str(inputs["ras"]), "--o", str(whole), "--models", str(models), "--threads", "2"]) == 0
    assert _info(capsys.readouterr().err) == []
    need = memory.PER_VOXEL["default"] * 128 ** 3
    budget = f"{need * 0.8 / 1e6:.0f}M"   # two 128x128x96 tiles fit (0.75 of the grid), the whole grid does not
    assert main(["--i", str(inputs["ras"]), "--o", str(tiled), "--vol", str(tmp_path / "v.csv"), "--models",
                 str(models), "--threads", "2", "--max-memory", budget]) == 0
    info = _info(capsys.readouterr().err)
    assert len(info) == 1, info
    gb = [re.escape(f"{x / 1e9:.1f} GB") for x in (need, parse_size(budget), need * 0.75)]
    assert re.search(rf"\[WARN\] .*mni_ras\.nii\.gz: estimated {gb[0]} for network grid 128x128x128 exceeds the memory "
                     rf"budget of {gb[1]} \(--max-memory {gb[1]}\): segmenting in 2 tiles of 128x128x96 \(1x1x2\) "
                     rf"overlapping by >= 32 voxels, estimated {gb[2]}; results can differ from upstream near tile "
                     r"seams$", info[0]), info[0]
    a, b = _seg(whole), _seg(tiled)
    # the segmentation after post-processing, in the input's space (measured: 0.84 and a mean Dice of 0.41)
    assert a.shape == b.shape and agreement(a, b) >= 0.8 and mean_dice(a, b) >= 0.35, (agreement(a, b),
                                                                                        mean_dice(a, b))
    # a budget the untiled run fits is no tiling, and the same bytes
    again = tmp_path / "again.nii.gz"
    assert main(["--i", str(inputs["ras"]), "--o", str(again), "--models", str(models), "--threads", "2",
                 "--max-memory", "100G"]) == 0
    assert _info(capsys.readouterr().err) == []
    assert again.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("flags, keys", [
    (["--parc", "--qc", "QC"], ("seg2", "parc", "qc")),
    (["--robust"], ("robust",)),
    (["--fast"], ("seg2",)),
], ids=["parc-qc", "robust", "fast"])
def test_tiled_runs_end_to_end(weights, inputs, tmp_path, capsys, small_tiles, monkeypatch, flags, keys):
    """Each model runs tiled through the whole command: outputs complete and well formed, one [WARN] line."""
    from synthseg_native.engine import labels as L

    models = weights.need(*keys)
    flags = [str(tmp_path / "qc.csv") if f == "QC" else f for f in flags]
    monkeypatch.setenv(memory.ENV_TILES, "1x2x1")  # the layout a budget would pick here, without its arithmetic
    seg, post = tmp_path / "seg.nii.gz", tmp_path / "post.nii.gz"
    assert main(["--i", str(inputs["ras"]), "--o", str(seg), "--vol", str(tmp_path / "vol.csv"), "--post", str(post),
                 "--models", str(models), "--threads", "2", *flags]) == 0
    info = _info(capsys.readouterr().err)
    assert len(info) == 1 and "$SYNTHSEG_TILES asks for tiles" in info[0] and "2 tiles of 128x96x128 (1x2x1)" in info[0]
    labels = set(np.unique(_seg(seg)).tolist())
    assert len(labels) >= 5 and labels - set(range(1000, 3000)) <= set(L.LabelSet.build().labels.tolist())
    np.testing.assert_allclose(np.asanyarray(nib.load(str(post)).dataobj).sum(-1), 1.0, atol=1e-4)
    assert len((tmp_path / "vol.csv").read_text().splitlines()) == 2
    if "--parc" in flags:
        assert {v for v in labels if v >= 1000} <= set(L.parcellation_labels().tolist()) and max(labels) >= 1000
    if "--qc" in flags:
        rows = (tmp_path / "qc.csv").read_text().splitlines()
        scores = np.array(rows[1].split(",")[1:], dtype=float)
        assert len(rows) == 2 and scores.size == len(rows[0].split(",")) - 1 and np.all(np.isfinite(scores))


def test_bad_forced_tiles_fail_the_image_with_one_line(weights, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(memory.ENV_TILES, "9x1x1")
    assert main(["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz"), "--models",
                 str(weights.need("seg2"))]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "$SYNTHSEG_TILES='9x1x1' is not a tiling of the network grid 128x128x128" in err[0], err


def test_refused_only_when_the_smallest_tiles_do_not_fit(weights, inputs, tmp_path, capsys, small_tiles):
    out = tmp_path / "seg.nii.gz"
    assert main(["--i", str(inputs["ras"]), "--o", str(out), "--models", str(weights.need("seg2")),
                 "--max-memory", "100M"]) == 1
    err = err_lines(capsys.readouterr().err)
    # the figures the message must carry, from the (zeroed-constant) model: the untiled need and the smallest tiles'
    need = memory.PER_VOXEL["default"] * 128 ** 3
    floor = memory.PER_VOXEL["default"] * 96 ** 3
    assert floor < need and floor > 1e8
    expected = (f"needs about {need / 1e9:.1f} GB of memory (network grid 128x128x128 at 1 mm; about {floor / 1e9:.1f} "
                "GB even in tiles of 96x96x96) but only 0.1 GB is available (--max-memory 0.1 GB)")
    assert len(err) == 1 and expected in err[0], err
    assert "--crop" in err[0] and "raise --max-memory" in err[0] and not out.exists()
