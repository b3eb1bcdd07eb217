"""QC snapshots: FreeSurfer colours, slices in the right place and orientation, a page that lists every scan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.batch import snapshots
from synthseg_native.cli import main
from synthseg_native.io import colours
from synthseg_native.tools import demo


def test_lut_is_freesurfer_colours():
    lut = snapshots.colour_lut()
    for idx, (_, r, g, b) in {**colours.SEGMENTATION_LUT, **colours.PARCELLATION_LUT}.items():
        assert tuple(lut[idx]) == (r, g, b)
    assert tuple(lut[1]) == snapshots.UNKNOWN_RGB  # label 1 is not SynthSeg's: it must stand out


def test_overlay_blends_labels_in_their_colour():
    gray = np.full((2, 2), 0.5)
    labels = np.array([[0, 17], [53, 2999]])
    rgb = snapshots.overlay(gray, labels, alpha=0.4)
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rgb[0, 1], 0.6 * 0.5 + 0.4 * np.array([220, 216, 20]) / 255)  # Left-Hippocampus
    np.testing.assert_allclose(rgb[1, 0], rgb[0, 1])  # Right-Hippocampus: same colour
    np.testing.assert_allclose(rgb[1, 1], 0.6 * 0.5 + 0.4 * np.array(snapshots.UNKNOWN_RGB) / 255)


def _blob_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A seg on an LAS grid with one label in the patient's left-anterior-superior corner, and an image on a
    RAS grid of another voxel size that is bright exactly there (so overlay alignment can be checked)."""
    shape = (40, 48, 36)
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[:3, 3] = [20, -24, -18]
    seg = np.zeros(shape, np.int32)
    # LAS: x index grows towards the patient's left; y anterior; z superior
    seg[28:36, 32:42, 24:32] = 17
    nib.save(nib.Nifti1Image(seg, las), str(tmp_path / "seg.nii.gz"))
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    ras[:3, 3] = [-19.5, -23.5, -17.5]
    world = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 24, 18)], indexing="ij"), -1) * 2.0 + ras[:3, 3]
    img = ((world[..., 0] <= -8) & (world[..., 0] >= -15) & (world[..., 1] >= 8) & (world[..., 1] <= 17)
           & (world[..., 2] >= 6) & (world[..., 2] <= 13)).astype(np.float32) * 100 + 10
    nib.save(nib.Nifti1Image(img, ras), str(tmp_path / "img.nii.gz"))
    return tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz"


def test_slices_are_ras_oriented_and_aligned(tmp_path):
    image, seg = _blob_pair(tmp_path)
    sag, cor, axi = snapshots.ortho_slices(str(image), str(seg))
    for plane in (sag, cor, axi):
        rows, cols = np.nonzero(plane["labels"])
        assert len(rows), plane["title"]
        h, w = plane["labels"].shape
        if plane is sag:  # columns posterior → anterior, rows superior → inferior
            assert cols.min() > w / 2 and rows.max() < h / 2
        if plane is cor:  # columns patient left → right, rows superior → inferior
            assert cols.max() < w / 2 and rows.max() < h / 2
        if plane is axi:  # columns left → right, rows anterior → posterior
            assert cols.max() < w / 2 and rows.max() < h / 2
        # the bright block of the image lies under the label (sampled through both affines; its edges are
        # interpolated between the 2 mm image voxels): same centre, bright inside, dark outside
        gray, mask = plane["gray"], plane["labels"] > 0
        bright = np.argwhere(gray > 0.5).mean(0)
        assert np.abs(bright - np.argwhere(mask).mean(0)).max() <= 1.0
        assert gray[mask].mean() > 0.7 and gray[~mask].mean() < 0.1
    assert sag["sides"] == ("P", "A") and cor["sides"] == ("L", "R")


def test_render_writes_a_png(tmp_path):
    image, seg = _blob_pair(tmp_path)
    png = snapshots.render(str(image), str(seg), str(tmp_path / "s.png"), title="blob")
    from matplotlib.image import imread

    pixels = imread(str(png))
    assert pixels.shape[:2] == (340, 900)
    hippo = np.array([220, 216, 20]) / 255
    rgb = pixels[..., :3].reshape(-1, 3)
    # some pixel is the grey+hippocampus blend (the label is drawn in its FreeSurfer colour)
    blend_hue = (rgb[:, 0] > rgb[:, 2] + 0.2) & (rgb[:, 1] > rgb[:, 2] + 0.2)
    assert blend_hue.any() and np.all(hippo[:2] > hippo[2])


def test_page_lists_every_scan(tmp_path):
    image, seg = _blob_pair(tmp_path)
    qc = tmp_path / "qc"
    snapshots.record(qc, "sub-01", str(image), str(seg), "done", seconds=12.5,
                     volumes={"total intracranial": 1500000.0, "left hippocampus": 4000.0,
                              "right hippocampus": 4100.0}, qc={"general csf": 0.91, "cerebellum": 0.42})
    snapshots.record(qc, "sub-02", str(image), str(seg), "current")
    snapshots.record(qc, "sub<3>", str(image), str(seg), "failed", error="sub<3>: cannot read image")
    (qc / "notes.json").write_text('{"something": "else"}')  # not a record: ignored
    page = snapshots.write_index(qc).read_text()
    rows = re.findall(r"<tr class=\"(\w+)\">", page)
    assert rows == ["failed", "done", "current"]  # failures first, then by name
    assert page.count('<img src="sub-01.png"') == 1 and page.count('<img src="sub-02.png"') == 1
    assert "sub&lt;3&gt;" in page and "<3>" not in page
    assert ">1500.0<" in page and ">8.1<" in page  # mL: intracranial, both hippocampi
    assert ">0.42<" in page and "min QC" in page and ">12.5<" in page
    assert not (qc / "sub<3>.png").exists()
    rec = json.loads((qc / "sub-01.json").read_text())
    assert rec["volumes"] == {"intracranial": 1500000.0, "hippocampi": 8100.0} and rec["status"] == "done"


def test_page_fits_a_laptop_screen_and_keeps_the_csv_order(tmp_path):
    """The columns a reader needs first are shown, the rest behind a switch; QC scores in the QC CSV's order (the
    records' JSON sorts its keys); a resumed run's skipped scans are counted as current."""
    from synthseg_native.batch import tables as V
    from synthseg_native.engine import labels as L

    image, seg = _blob_pair(tmp_path)
    qc = tmp_path / "qc"
    order = V.qc_columns(L.LabelSet.build())
    scores = {c: 0.5 + k / 100 for k, c in enumerate(order)}
    volumes = {c: 1000.0 for parts in snapshots.KEY_VOLUMES.values() for c in parts}
    for name in ("a", "b", "c"):
        snapshots.record(qc, name, str(image), str(seg), "done", seconds=3.0, volumes=volumes, qc=scores)
    assert list(json.loads((qc / "a.json").read_text())["qc"]) == sorted(order)  # sorted keys on disk
    page = snapshots.index_html(snapshots.load_records(qc))
    heads = re.findall(r'<th class="([a-z]*)">([^<]*)</th>', page)
    assert [h for cls, h in heads if cls != "more"] == ["scan", "snapshot", "status", "time (s)", "intracranial (mL)",
                                                        "min QC"]
    assert [h for cls, h in heads if cls == "more"][-len(order):] == [f"QC {c}" for c in order]
    assert "show all columns (" in page and "#all:checked~table .more{display:table-cell}" in page
    assert "Last run: <b>3 segmented, 0 current" in page
    assert all(snapshots.mark_current(qc, name) for name in ("a", "b"))
    page = snapshots.index_html(snapshots.load_records(qc))
    assert "Last run: <b>1 segmented, 2 current (skipped by --resume), 0 failed</b>" in page
    assert json.loads((qc / "a.json").read_text())["seconds"] == 3.0  # the record keeps what it had
    assert not snapshots.mark_current(qc, "no such scan")


def test_batch_snapshots_and_page(weights, inputs, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("ras", "lia"):
        (src / inputs[name].name).write_bytes(inputs[name].read_bytes())
    qc = tmp_path / "qc"
    assert main(["--i", str(src), "--o", str(tmp_path / "out"), "--vol", str(tmp_path / "vol.csv"), "--snapshot",
                 str(qc), "--models", str(weights.need("seg2")), "--crop", "64", "--threads", "2"]) == 0
    names = ["mni_lia_synthseg", "mni_ras_synthseg"]
    assert sorted(p.stem for p in qc.glob("*.png")) == names
    page = (qc / "index.html").read_text()
    for name in names:
        assert f'<img src="{name}.png"' in page
        rec = json.loads((qc / f"{name}.json").read_text())
        assert rec["status"] == "done" and rec["seconds"] > 0 and set(rec["stages"]) >= {"network", "write"}
        assert rec["volumes"]["intracranial"] > 0 and rec["qc"] is None
    assert "intracranial (mL)" in page and "min QC" not in page


def test_batch_records_qc_scores(tmp_path):
    """--qc scores reach the record as the QC CSV writes them (the QC network itself is tested elsewhere)."""
    from synthseg_native.batch import tables as V
    from synthseg_native.batch.cohort import Batch
    from synthseg_native.batch.plan import plan_outputs
    from synthseg_native.config import Options
    from synthseg_native.engine import labels as L

    image, seg = _blob_pair(tmp_path)
    plan = plan_outputs(str(image), str(seg))
    opts = Options(i=str(image), o=str(seg), snapshot=str(tmp_path / "qc"))
    header = V.volume_columns(L.LabelSet.build(), parc=False)
    volumes = np.arange(len(header), dtype=float) * 1000
    scores = np.linspace(0, 1.2, 9)[None]  # background first; values above 1 are clipped like upstream's
    Batch(opts, plan).done(0, 3.0, {"network": 2.0}, volumes, scores)
    rec = json.loads((tmp_path / "qc" / f"{plan.names[0]}.json").read_text())
    assert rec["qc"] == dict(zip(V.qc_columns(L.LabelSet.build()), [0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.0]))
    assert rec["volumes"]["intracranial"] == 0.0 and rec["seconds"] == 3.0


@pytest.mark.parametrize("flags", ["--crop 64 --fast"])
def test_demo_writes_the_snapshot(weights, tmp_path, flags):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--models", str(weights.need("seg2")), "--flags", flags,
                      "--threads", "2"]) == 0
    assert (out / "qc" / "mni152_synthseg.png").is_file()
    assert 'src="mni152_synthseg.png"' in (out / "qc" / "index.html").read_text()
