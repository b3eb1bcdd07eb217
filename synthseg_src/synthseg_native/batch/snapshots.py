"""QC snapshots: one PNG per scan and a static cohort page, because people trust pictures, not numbers.

For each scan, ``--snapshot DIR`` writes ``DIR/<name>.png``: three orthogonal slices through the
segmentation's centre of mass, the input in grey with the labels overlaid in FreeSurfer's colours
(those of freeview, so a reader recognises the structures), and ``DIR/<name>.json`` with what the
page shows: status, run time, key volumes and QC scores. ``DIR/index.html`` lists every record in
the folder, one row per scan, so shards of one cohort writing into one folder give one page.

The slices are cut from the segmentation's grid (turned to RAS, an exact axis permutation) and the
input is sampled at those voxels' world positions, so the overlay is right for any orientation or
resolution, with or without ``--keepgeom``. Nothing here touches the segmentation's values.

    synthseg-native snapshots index DIR             # rebuild DIR/index.html
    synthseg-native snapshots render IMAGE SEG PNG  # one picture
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates

from ..engine import labels as L
from ..io import colours
from ..io.atomic import atomic_write, write_text
from ..io.images import library_messages
from . import tables as V

KIND = "synthseg-native snapshot"
ALPHA = 0.45  # label colour weight: structures stay readable and the anatomy below stays visible
UNKNOWN_RGB = (255, 0, 255)  # a label without a FreeSurfer colour shows in magenta, never silently grey
#: Page columns: name → the volume CSV columns summed (mm³; shown in mL).
KEY_VOLUMES: dict[str, tuple[str, ...]] = {
    "intracranial": ("total intracranial",),
    "cerebral WM": ("left cerebral white matter", "right cerebral white matter"),
    "cerebral cortex": ("left cerebral cortex", "right cerebral cortex"),
    "lateral ventricles": ("left lateral ventricle", "right lateral ventricle"),
    "hippocampi": ("left hippocampus", "right hippocampus"),
}


def colour_lut() -> np.ndarray:
    """(max label + 1, 3) uint8 RGB of every FreeSurfer label SynthSeg writes (with --parc too)."""
    table = colours.lookup_table(parc=True)
    lut = np.tile(np.array(UNKNOWN_RGB, dtype=np.uint8), (max(table) + 1, 1))
    for idx, (_, r, g, b) in table.items():
        lut[idx] = (r, g, b)
    return lut


def overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """RGB floats in [0, 1]: ``gray`` (in [0, 1]) with every non-zero label blended in its colour."""
    lut = colour_lut().astype(np.float64) / 255
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=-1).astype(np.float64)
    labels = np.asarray(labels)
    mask = labels > 0
    colour = np.empty((int(mask.sum()), 3))
    known = labels[mask] < len(lut)
    colour[known] = lut[labels[mask][known]]
    colour[~known] = np.array(UNKNOWN_RGB) / 255
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    return rgb


def _input_volume(image_path: str) -> tuple[np.ndarray, np.ndarray]:
    with library_messages(image_path, report=False):  # reported when the scan was segmented
        img = nib.load(image_path)
        data = np.squeeze(np.asanyarray(img.dataobj)).astype(np.float32)
    while data.ndim > 3:  # several channels or frames: show the first
        data = data[..., 0]
    while data.ndim < 3:
        data = data[..., None]
    return data, np.asarray(img.affine, dtype=np.float64)


def ortho_slices(image_path: str, seg_path: str) -> list[dict[str, Any]]:
    """Sagittal, coronal and axial planes (grey in [0, 1], labels, display aspect, title), RAS-oriented,
    rows top to bottom = superior→inferior (anterior→posterior for axial), columns left→right."""
    seg_img = nib.as_closest_canonical(nib.load(seg_path))
    seg = np.asarray(seg_img.dataobj).astype(np.int64)
    while seg.ndim > 3:
        seg = seg[..., 0]
    data, src_affine = _input_volume(image_path)
    to_src = np.linalg.inv(src_affine) @ seg_img.affine
    inside = np.argwhere(seg > 0)
    centre = inside.mean(0).round().astype(int) if len(inside) else np.array(seg.shape) // 2
    zooms = np.sqrt((seg_img.affine[:3, :3] ** 2).sum(0))
    planes = []
    for axis, view, letter in ((0, "sagittal", "x"), (1, "coronal", "y"), (2, "axial", "z")):
        rest = [a for a in range(3) if a != axis]
        grid = np.meshgrid(*(np.arange(seg.shape[a]) for a in rest), indexing="ij")
        ijk = np.zeros((4, grid[0].size))
        ijk[axis] = centre[axis]
        ijk[rest[0]], ijk[rest[1]] = grid[0].ravel(), grid[1].ravel()
        ijk[3] = 1
        src = (to_src @ ijk)[:3]
        gray = map_coordinates(data, src, order=1, mode="constant", cval=0.0).reshape(grid[0].shape)
        labels = np.take(seg, centre[axis], axis=axis)
        # plane[a, b] with a, b the remaining RAS axes; show b upwards (transpose, flip) and a left→right
        planes.append({"gray": gray.T[::-1], "labels": labels.T[::-1], "aspect": zooms[rest[1]] / zooms[rest[0]],
                       "title": f"{view} {letter}={centre[axis]}", "sides": ("P", "A") if axis == 0 else ("L", "R")})
    values = np.concatenate([p["gray"][p["gray"] > 0].ravel() for p in planes] or [np.zeros(1)])
    lo, hi = (np.percentile(values, (1, 99)) if values.size else (0.0, 1.0))
    for p in planes:
        p["gray"] = np.clip((p["gray"] - lo) / max(hi - lo, 1e-6), 0, 1)
    return planes


def render(image_path: str, seg_path: str, png_path: str, title: str = "") -> Path:
    """Write the three-slice overlay PNG (atomically) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    planes = ortho_slices(image_path, seg_path)
    fig = Figure(figsize=(9, 3.4), dpi=100, facecolor="black")
    axes = fig.subplots(1, 3)
    for ax, p in zip(axes, planes):
        ax.imshow(overlay(p["gray"], p["labels"]), aspect=p["aspect"], interpolation="nearest")
        ax.set_title(p["title"], color="white", fontsize=13)
        ax.set_axis_off()
        # big enough to read in the cohort page's thumbnail (about half this size), on a box that any overlay leaves
        # readable
        for x, letter, align in ((0.01, p["sides"][0], "left"), (0.99, p["sides"][1], "right")):
            ax.text(x, 0.5, letter, color="yellow", fontsize=20, fontweight="bold", transform=ax.transAxes,
                    ha=align, va="center", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    atomic_write(png_path, lambda tmp: canvas.print_png(str(tmp)))
    return Path(png_path)


def key_volumes(volumes: dict[str, float] | None) -> dict[str, float] | None:
    """The page's volume columns (mm³) from a full row of the volume CSV."""
    if not volumes:
        return None
    out = {}
    for name, parts in KEY_VOLUMES.items():
        if all(p in volumes for p in parts):
            out[name] = float(sum(volumes[p] for p in parts))
    return out


def _paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{name}.png", d / f"{name}.json"


def record(directory: str | os.PathLike, name: str, image: str, seg: str, status: str, *,
           seconds: float | None = None, stages: dict[str, float] | None = None,
           volumes: dict[str, float] | None = None, qc: dict[str, float] | None = None,
           error: str | None = None) -> Path:
    """Snapshot and record of one scan (status ``done``, ``current`` or ``failed``); returns the JSON path."""
    png, rec = _paths(directory, name)
    if status == "failed":
        png.unlink(missing_ok=True)  # an older picture would show a result this input no longer has
    else:
        render(image, seg, str(png), title=name)
    data = {"kind": KIND, "name": name, "input": image, "segmentation": seg, "status": status,
            "png": png.name if status != "failed" else None, "seconds": seconds, "stages": stages,
            "volumes": key_volumes(volumes), "qc": qc, "error": error,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text(rec, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return rec


def mark_current(directory: str | os.PathLike, name: str) -> bool:
    """A scan skipped by ``--resume``: its record (picture, volumes, time) now says ``current``, so the page counts the
    last run as the terminal did; False when there is no usable record to mark (then :func:`record` makes one)."""
    png, rec = _paths(directory, name)
    try:
        data = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("kind") != KIND or not data.get("png") or not png.is_file():
        return False
    data.update(status="current", written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_text(rec, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return True


def load_records(directory: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kind") == KIND:
            out.append(data)
    return out


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


#: The columns a reader needs first; every other volume and QC score is behind the page's "all columns" switch.
FIRST_VOLUMES = ("intracranial",)
STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right;vertical-align:middle}"
    "td.l,th.l{text-align:left}tr.failed{background:#fdd}tr.current{color:#555}img{width:560px;display:block}"
    "small{color:#666}.more{display:none}#all:checked~table .more{display:table-cell}"
    "#all:checked~table img{width:320px}"
    "label{display:inline-block;margin:0 0 .6em;font-size:14px;cursor:pointer}"
)


def _volume_cell(volumes: dict[str, float], column: str, cls: str = "") -> str:
    value = volumes.get(column)
    return f'<td class="{cls}">{_cell(None if value is None else value / 1000)}</td>'


def qc_order(names: list[str]) -> list[str]:
    """QC columns in the QC CSV's order (the records' JSON sorts keys); names it does not know follow."""
    canonical = V.qc_columns(L.LabelSet.build(False))
    return [c for c in canonical if c in names] + [c for c in names if c not in canonical]


def index_html(records: list[dict[str, Any]], title: str = "SynthSeg cohort") -> str:
    """The cohort page, readable on a 1366-pixel screen: failures first, then by name; per scan its name, picture,
    status, time, intracranial volume and lowest QC score (every score on hover); the other key volumes (mL) and
    each QC score in the CSV's order behind a switch. The counts are those of the records' statuses: the last run
    marks the scans it skipped ``current``, so they match what its terminal said."""
    records = sorted(records, key=lambda r: (r.get("status") != "failed", r.get("name", "")))
    vol_cols = [c for c in KEY_VOLUMES if any((r.get("volumes") or {}).get(c) is not None for r in records)]
    first_vols = [c for c in vol_cols if c in FIRST_VOLUMES]
    more_vols = [c for c in vol_cols if c not in FIRST_VOLUMES]
    qc_cols = qc_order(list(dict.fromkeys(c for r in records for c in (r.get("qc") or {}))))
    counts = {s: sum(r.get("status") == s for r in records) for s in ("done", "current", "failed")}
    latest = max((str(r.get("written", "")) for r in records), default="")

    def th(text: str, cls: str = "") -> str:
        return f'<th class="{cls}">{html.escape(text)}</th>'

    head = [th("scan", "l"), th("snapshot", "l"), th("status"), th("time (s)")]
    head += [th(f"{c} (mL)") for c in first_vols] + ([th("min QC")] if qc_cols else [])
    head += [th(f"{c} (mL)", "more") for c in more_vols] + [th(f"QC {c}", "more") for c in qc_cols]
    hidden = len(more_vols) + len(qc_cols)
    lines = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(records)} scan(s). Last run: <b>{counts['done']} segmented, {counts['current']} current (skipped by "
        f"--resume), {counts['failed']} failed</b>{f' (last record {html.escape(latest)})' if latest else ''}. Labels "
        "in FreeSurfer colours; the patient's left is on the left (neurological convention). Page written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
    ]
    if hidden:
        lines.append(f'<input type="checkbox" id="all"><label for="all"> show all columns ({hidden} more: key volumes '
                     "and every QC score)</label>")
    lines.append("<table><thead><tr>" + "".join(head) + "</tr></thead><tbody>")
    for r in records:
        name, status = r.get("name", "?"), r.get("status", "?")
        scan = (f'{html.escape(name)}<br><small title="{html.escape(str(r.get("input")))}">'
                f'{html.escape(os.path.basename(str(r.get("input"))))}</small>')
        if r.get("error"):
            scan += f"<br><small>{html.escape(str(r['error']))}</small>"
        png = r.get("png")
        thumb = (f'<a href="{html.escape(png)}"><img src="{html.escape(png)}" alt="{html.escape(name)}" '
                 f'loading="lazy"></a>') if png else "–"
        vols, qc = r.get("volumes") or {}, r.get("qc") or {}

        cells = [f'<td class="l">{scan}</td>', f'<td class="l">{thumb}</td>', f"<td>{html.escape(status)}</td>",
                 f"<td>{_cell(r.get('seconds'))}</td>", *[_volume_cell(vols, c) for c in first_vols]]
        if qc_cols:
            low = min(qc.values()) if qc else None
            every = html.escape(", ".join(f"{c} {qc[c]:.2f}" for c in qc_cols if c in qc))
            cells.append(f'<td title="{every}">{_cell(low, 2)}</td>')
        cells += [_volume_cell(vols, c, "more") for c in more_vols]
        cells += [f'<td class="more">{_cell(qc.get(c), 2)}</td>' for c in qc_cols]
        lines.append(f'<tr class="{html.escape(status)}">' + "".join(cells) + "</tr>")
    lines += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(lines)


def write_index(directory: str | os.PathLike) -> Path:
    """Rebuild ``directory/index.html`` from every scan record in it."""
    path = Path(directory) / "index.html"
    write_text(path, index_html(load_records(directory)))
    return path
