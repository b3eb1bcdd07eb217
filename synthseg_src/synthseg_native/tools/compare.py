"""``make diff``: is segmentation A the same result as segmentation B (native vs upstream or Docker)?

Byte comparison of the files says nothing useful (gzip headers and timestamps differ, and a single
flipped voxel hides in the noise), so this compares what a user of the outputs sees: the grid
(shape, affine, on-disk dtype), every voxel's label, per-label Dice, the posteriors' largest
difference and every volume in the CSVs. The verdict and the numbers go to a markdown report that
can be committed under ``results/`` as evidence; the exit status makes it usable as a gate.

A and B may also be two stage output folders (make compare): each one's segmentation, posteriors
and volume CSV are found by their names.

Two kinds of comparison, two sets of tolerances (``--tolerance``): ``exact`` (the default) for runs that must give
upstream's bytes (the TF engine against upstream or the old Docker step); ``float32`` for runs that differ by float32
rounding by design (the torch backend against the tf one, ``--bn unfused``, another CPU's kernels): the bounds
docs/equivalence.md documents and the tests hold, at most 1e-4 of the voxels differing, 99.99 % of the posterior
values within 2e-4, volumes within 2 mm³.

Usage: ``synthseg-native-compare A B [--post-a PA --post-b PB] [--vol-a VA --vol-b VB]
[--report FILE] [--tolerance exact|float32] [--max-voxel-diff N] [--min-dice D] [--max-post-diff X]
[--max-vol-diff MM3]``
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from ..engine import labels as L
from ..io.atomic import image_extension, write_text
from ..log import DONE

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too

AFFINE_ATOL = 1e-4  # mm; headers store float32, so equal grids agree far better than this
RESULTS_DIR = Path("results") / "diff"


class CompareError(Exception):
    """An input cannot be read or the arguments do not pair up; reported as one [ERR] line."""


@dataclass
class Tolerances:
    """What may differ. ``max_voxel_share`` (a fraction of the voxels) replaces ``max_voxel_diff`` when set;
    ``post_share`` judges the posteriors by the share of values beyond ``max_post_diff`` instead of their maximum
    (a flipped voxel moves its posteriors by up to 1 after post-processing)."""

    max_voxel_diff: int = 0
    min_dice: float | None = None
    max_post_diff: float = 1e-6
    max_vol_diff: float = 0.01
    max_voxel_share: float | None = None
    post_share: float | None = None


#: ``--tolerance``: the default (same bytes expected) and float32 rounding (backends, precisions, BatchNorm forms;
#: docs/equivalence.md#pytorch-backend).
PRESETS = {"exact": Tolerances(),
           "float32": Tolerances(max_post_diff=2e-4, max_vol_diff=2.0, max_voxel_share=1e-4, post_share=1e-4)}
FLOAT32_HINT = ("comparing two backends, precisions or BatchNorm forms? They agree to float32 rounding, not to the "
                "byte: add --tolerance float32 (make diff DIFF_FLAGS='--tolerance float32'; docs/equivalence.md)")


@dataclass
class Comparison:
    """The report's markdown lines and the reasons (if any) the two sides count as different."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def fail_if(self, bad: bool, reason: str) -> str:
        if bad:
            self.failures.append(reason)
        return "FAIL" if bad else "ok"


def load(path: str) -> nib.spatialimages.SpatialImage:
    if image_extension(path) is None:
        raise CompareError(f"{path}: not a .nii, .nii.gz or .mgz file")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for missing or corrupt files
        raise CompareError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _data(img: nib.spatialimages.SpatialImage, path: str) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:
        raise CompareError(f"{path}: cannot read voxels ({type(exc).__name__}: {exc})") from exc


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def compare_geometry(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
                     res: Comparison) -> bool:
    """Returns whether the two grids coincide, i.e. whether voxel-wise comparison means anything."""
    same_shape = a.shape == b.shape
    affine_diff = float(np.max(np.abs(a.affine - b.affine)))
    da, db = a.get_data_dtype().newbyteorder("="), b.get_data_dtype().newbyteorder("=")  # .mgz is big-endian
    res.lines += ["## Geometry", ""] + _table(["", "A", "B", "check"], [
        ["shape", a.shape, b.shape, res.fail_if(not same_shape, f"shapes differ: {a.shape} vs {b.shape}")],
        ["dtype", da.name, db.name, res.fail_if(da != db, f"dtypes differ: {da.name} vs {db.name}")],
        ["affine max abs diff (mm)", f"{affine_diff:.3g}", "", res.fail_if(
            affine_diff > AFFINE_ATOL, f"affines differ by up to {affine_diff:.3g} (images are misaligned)")],
    ]) + [""]
    return same_shape and affine_diff <= AFFINE_ATOL


def _label_names() -> dict[int, str]:
    names = dict(zip(L.raw_segmentation_labels().tolist(), L.raw_segmentation_names().tolist()))
    names.update(zip(L.parcellation_labels().tolist()[1:], L.parcellation_names().tolist()[1:]))
    return names


def _counts(x: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(x, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def compare_labels(a: np.ndarray, b: np.ndarray, tol: Tolerances, res: Comparison) -> None:
    """Voxel agreement and per-label Dice (from three np.unique counts, not one pass per label)."""
    n_diff, total = int(np.count_nonzero(a != b)), a.size
    allowed = tol.max_voxel_diff if tol.max_voxel_share is None else int(tol.max_voxel_share * total)
    verdict = res.fail_if(n_diff > allowed, f"{n_diff} voxels differ")
    share = f"{100 * n_diff / total:.4g} %"
    limit = f"{allowed}" if tol.max_voxel_share is None else f"{allowed} ({100 * tol.max_voxel_share:g} %)"
    res.lines += ["## Labels", "", f"- voxels that differ: **{n_diff}** of {total} ({share}), "
                  + f"tolerance {limit}: {verdict}"]
    counts_a, counts_b, inter = _counts(a), _counts(b), _counts(a[a == b])
    names, rows, low = _label_names(), [], []
    for lab in sorted(set(counts_a) | set(counts_b)):
        if lab == 0:
            continue
        ca, cb = counts_a.get(lab, 0), counts_b.get(lab, 0)
        dice = 2 * inter.get(lab, 0) / (ca + cb)
        if tol.min_dice is not None and dice < tol.min_dice:
            low.append(f"{lab} ({dice:.4f})")
        rows.append([lab, names.get(int(lab), ""), ca, cb, ca - cb, f"{dice:.6f}"])
    dices = [float(r[-1]) for r in rows]
    limit = "not checked" if tol.min_dice is None else f"tolerance {tol.min_dice}: " + res.fail_if(
        bool(low), f"Dice below {tol.min_dice} for label(s) {', '.join(low)}")
    res.lines += [f"- lowest Dice: **{min(dices):.6f}** ({limit})" if dices else "- no foreground labels", ""]
    res.lines += _table(["label", "structure", "voxels A", "voxels B", "A − B", "Dice"], rows) + [""]


def compare_posteriors(path_a: str, path_b: str, tol: Tolerances, res: Comparison) -> None:
    pa, pb = (_data(load(p), p) for p in (path_a, path_b))
    res.lines += ["## Posteriors", "", f"- A: `{os.path.abspath(path_a)}` {pa.shape}",
                  f"- B: `{os.path.abspath(path_b)}` {pb.shape}"]
    if pa.shape != pb.shape:
        res.fail_if(True, f"posterior shapes differ: {pa.shape} vs {pb.shape}")
        res.lines += ["- shapes differ: FAIL", ""]
        return
    # channel by channel, so two full-brain posterior stacks do not need a third as big for |A − B|
    flat_a, flat_b = pa.reshape(pa.shape[:3] + (-1,)), pb.reshape(pb.shape[:3] + (-1,))
    worst, beyond = 0.0, 0
    for c in range(flat_a.shape[-1]):
        delta = np.abs(flat_a[..., c].astype(np.float64) - flat_b[..., c])
        worst = max(worst, float(np.max(delta)))
        beyond += int(np.count_nonzero(~(delta <= tol.max_post_diff)))
    share = beyond / max(flat_a.size, 1)
    if tol.post_share is None:
        verdict = res.fail_if(not worst <= tol.max_post_diff, f"posteriors differ by up to {worst:.3g}")
        res.lines += [f"- max abs difference: **{worst:.3g}** (tolerance {tol.max_post_diff:g}): {verdict}", ""]
        return
    verdict = res.fail_if(share > tol.post_share, f"{100 * share:.3g} % of the posterior values differ by more "
                          f"than {tol.max_post_diff:g}")
    res.lines += [f"- max abs difference: **{worst:.3g}** (not checked: a flipped voxel moves its posteriors)",
                  f"- values differing by more than {tol.max_post_diff:g}: **{100 * share:.3g} %** (tolerance "
                  f"{100 * tol.post_share:g} %): {verdict}", ""]


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except OSError as exc:
        raise CompareError(f"{path}: cannot read ({exc})") from exc
    if not rows:
        raise CompareError(f"{path}: empty CSV")
    return rows[0][1:], [r[1:] for r in rows[1:]]  # first column: subject name, not a volume


def _delta(x: str, y: str) -> float:
    try:
        return abs(float(x) - float(y))
    except ValueError:  # not a number: only equal text agrees
        return 0.0 if x == y else float("inf")


def compare_volumes(path_a: str, path_b: str, tol: Tolerances, res: Comparison) -> None:
    (head_a, rows_a), (head_b, rows_b) = _read_csv(path_a), _read_csv(path_b)
    res.lines += ["## Volumes (mm³)", "", f"- A: `{os.path.abspath(path_a)}` ({len(rows_a)} row(s))",
                  f"- B: `{os.path.abspath(path_b)}` ({len(rows_b)} row(s))"]
    only = sorted(set(head_a) ^ set(head_b))
    if only:
        res.fail_if(True, f"volume columns differ: {', '.join(only)}")
        res.lines.append(f"- columns in only one file: {', '.join(only)}: FAIL")
    if len(rows_a) != len(rows_b):
        res.fail_if(True, f"volume CSVs have {len(rows_a)} vs {len(rows_b)} rows")
    rows, worst = [], 0.0
    for col in [c for c in head_a if c in head_b]:
        ia, ib = head_a.index(col), head_b.index(col)
        delta = max((_delta(ra[ia], rb[ib]) for ra, rb in zip(rows_a, rows_b)), default=0.0)
        worst = max(worst, delta)
        first = ([r[ia] for r in rows_a[:1]] + [""])[:1] + ([r[ib] for r in rows_b[:1]] + [""])[:1]
        rows.append([col, *first, f"{delta:.4g}" + (" ✗" if delta > tol.max_vol_diff else "")])
    verdict = res.fail_if(worst > tol.max_vol_diff, f"volumes differ by up to {worst:.4g} mm³")
    res.lines += [f"- max abs difference: **{worst:.4g}** mm³ (tolerance {tol.max_vol_diff:g}): {verdict}",
                  ""]
    res.lines += _table(["structure", "A (first row)", "B (first row)", "max abs Δ"], rows) + [""]


def compare(seg_a: str, seg_b: str, tol: Tolerances, post: tuple[str, str] | None = None,
            vol: tuple[str, str] | None = None) -> Comparison:
    res = Comparison()
    img_a, img_b = load(seg_a), load(seg_b)
    if compare_geometry(img_a, img_b, res):
        compare_labels(_data(img_a, seg_a), _data(img_b, seg_b), tol, res)
    else:
        res.lines += ["Voxel-wise checks skipped: the two grids do not coincide.", ""]
    if post:
        compare_posteriors(*post, tol, res)
    if vol:
        compare_volumes(*vol, tol, res)
    verdict = "**PASS**" if not res.failures else "**FAIL**: " + "; ".join(res.failures)
    name_a, name_b = _names(seg_a, seg_b)
    res.lines = [f"# SynthSeg comparison: {name_a} vs {name_b}", "",
                 f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"- A: `{os.path.abspath(seg_a)}`",
                 f"- B: `{os.path.abspath(seg_b)}`", f"- verdict: {verdict}", ""] + res.lines
    return res


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(image_extension(name) or "")] if image_extension(name) else name


def _names(seg_a: str, seg_b: str) -> tuple[str, str]:
    """Short names for the two sides; the parent folder joins them when the file names are equal
    (native/x_synthseg vs reference/x_synthseg)."""
    a, b = _stem(seg_a), _stem(seg_b)
    if a != b:
        return a, b
    folder_a, folder_b = (os.path.basename(os.path.dirname(os.path.abspath(p))) for p in (seg_a, seg_b))
    return f"{folder_a}-{a}", f"{folder_b}-{b}"


def default_report(seg_a: str, seg_b: str) -> Path:
    a, b = _names(seg_a, seg_b)
    return RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{a}-vs-{b}.md"


def from_folder(folder: str) -> tuple[str, str | None, str | None]:
    """A stage's output folder: its one segmentation, and its posteriors and volumes if present."""
    names = sorted(os.listdir(folder))
    images = [n for n in names if image_extension(n)]
    segs = [n for n in images if not _stem(n).endswith(("_posteriors", "_resampled"))]
    if len(segs) != 1:
        raise CompareError(f"{folder}: expected one segmentation, found {len(segs)} ({', '.join(segs)})")
    post = [n for n in images if _stem(n).endswith("_posteriors")]
    vols = [n for n in names if n.endswith("_vols.csv")]

    def one(found: list[str]) -> str | None:
        return os.path.join(folder, found[0]) if len(found) == 1 else None

    return os.path.join(folder, segs[0]), one(post), one(vols)


def _pair(parser: argparse.ArgumentParser, a: str | None, b: str | None, what: str) -> tuple[str, str] | None:
    if bool(a) != bool(b):
        parser.error(f"give both {what} files or neither")
    return (a, b) if a and b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synthseg-native-compare",
                                description="Compare two SynthSeg results (A: native, B: reference).")
    p.add_argument("seg_a", help="segmentation A (.nii, .nii.gz, .mgz), or a stage's output folder")
    p.add_argument("seg_b", help="segmentation B, or a folder (its posteriors and volumes are compared too)")
    p.add_argument("--post-a", help="posteriors of A")
    p.add_argument("--post-b", help="posteriors of B")
    p.add_argument("--vol-a", help="volume CSV of A")
    p.add_argument("--vol-b", help="volume CSV of B")
    p.add_argument("--report", help=f"markdown report path (default: {RESULTS_DIR}/<time>-<A>-vs-<B>.md)")
    p.add_argument("--tolerance", choices=list(PRESETS), default="exact",
                   help="exact (default: same bytes expected, the limits below) or float32 (backends, precisions, "
                   "BatchNorm forms: <= 0.01 %% of voxels, 99.99 %% of posterior values within 2e-4, volumes within "
                   "2 mm3; docs/equivalence.md); the flags below override single limits")
    p.add_argument("--max-voxel-diff", type=int, help="voxels allowed to differ (exact: 0)")
    p.add_argument("--min-dice", type=float, help="lowest per-label Dice allowed (default: not checked)")
    p.add_argument("--max-post-diff", type=float, help="posteriors' max |A-B| (exact: 1e-6)")
    p.add_argument("--max-vol-diff", type=float, help="volumes' max |A-B|, mm3 (exact: 0.01; float32: 2)")
    a = p.parse_args(argv)
    post = _pair(p, a.post_a, a.post_b, "--post-a/--post-b")
    vol = _pair(p, a.vol_a, a.vol_b, "--vol-a/--vol-b")
    given = {k: v for k, v in (("max_voxel_diff", a.max_voxel_diff), ("min_dice", a.min_dice),
                               ("max_post_diff", a.max_post_diff), ("max_vol_diff", a.max_vol_diff)) if v is not None}
    if a.max_voxel_diff is not None:
        given["max_voxel_share"] = None  # a count given: it is the limit
    tol = replace(PRESETS[a.tolerance], **given)
    try:
        if os.path.isdir(a.seg_a) and os.path.isdir(a.seg_b):
            (a.seg_a, post_a, vol_a), (a.seg_b, post_b, vol_b) = from_folder(a.seg_a), from_folder(a.seg_b)
            if post is None and post_a and post_b:
                post = (post_a, post_b)
            if vol is None and vol_a and vol_b:
                vol = (vol_a, vol_b)
        res = compare(a.seg_a, a.seg_b, tol, post, vol)
        report = Path(a.report) if a.report else default_report(a.seg_a, a.seg_b)
        write_text(report, "\n".join(res.lines) + "\n")
    except (CompareError, OSError) as exc:
        logger.error(str(exc))
        return 1
    logger.info(f"report: {report}")
    if res.failures:
        if a.tolerance == "exact":
            logger.info(FLOAT32_HINT)
        logger.error(f"results differ beyond the {a.tolerance} tolerance: " + "; ".join(res.failures))
        return 1
    logger.log(DONE, f"{a.seg_a} and {a.seg_b} agree within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
