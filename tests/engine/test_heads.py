"""--parc, --qc, --keepgeom and --addctab on small real inputs."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np

from engine_fixtures import reference
from synthseg_native.cli import main
from synthseg_native.engine import labels as L
from synthseg_native.engine.heads import make_shape
from synthseg_native.io.freesurfer import read_embedded_lut


def run(*args) -> int:
    return main([str(a) for a in args] + ["--threads", "2"])


def expected_volume_header(parc: bool) -> list[str]:
    names = reference("synthseg_segmentation_names_2.0")
    _, idx = np.unique(reference("synthseg_segmentation_labels_2.0"), return_index=True)
    header = ["subject", "total intracranial"] + names[idx].tolist()[1:]
    if parc:
        pnames = reference("synthseg_parcellation_names")
        _, pidx = np.unique(reference("synthseg_parcellation_labels"), return_index=True)
        header += pnames[pidx].tolist()[1:]
    return header


def test_parcellation_and_qc(weights, inputs, tmp_path):
    models = weights.need("seg2", "parc", "qc")
    seg, vol, qc = tmp_path / "seg.nii.gz", tmp_path / "vol.csv", tmp_path / "qc.csv"
    assert run("--i", inputs["ras"], "--o", seg, "--vol", vol, "--qc", qc, "--parc", "--models", models,
               "--crop", "64") == 0
    labels = set(np.unique(np.asanyarray(nib.load(str(seg)).dataobj)).tolist())
    parcels = {v for v in labels if v >= 1000}
    assert parcels and parcels <= set(L.parcellation_labels().tolist())
    assert not ({3, 42} & labels), "cortex voxels are replaced by parcels"
    rows = list(csv.reader(open(vol)))
    assert rows[0] == expected_volume_header(parc=True) and len(rows[0]) == 1 + 1 + 32 + 68
    values = np.array(rows[1][1:], dtype=float)
    assert np.all(values >= 0) and len(values) == 1 + 32 + 68
    qrows = list(csv.reader(open(qc)))
    names = reference("synthseg_qc_names_2.0")
    _, qidx = np.unique(reference("synthseg_qc_labels_2.0"), return_index=True)
    assert qrows[0] == ["subject"] + names[qidx].tolist()[1:]
    scores = qrows[1][1:]
    assert len(scores) == 8 and all(len(s.split(".")[1]) == 4 and 0 <= float(s) <= 1 for s in scores)


def test_robust_with_parcellation(weights, inputs, tmp_path):
    seg = tmp_path / "seg.nii.gz"
    assert run("--i", inputs["ras"], "--o", seg, "--robust", "--parc", "--models",
               weights.need("robust", "parc"), "--crop", "64") == 0
    assert np.asanyarray(nib.load(str(seg)).dataobj).max() >= 1000


def test_make_shape_crops_and_pads_around_foreground():
    x = np.zeros((10, 12, 8), dtype=np.int32)
    x[2:5, 3:9, 1:3] = 7
    x[0, 0, 0] = 24  # index 24 does not count as foreground (upstream's quirk)
    out = make_shape(x, target=6)
    assert out.shape == (6, 6, 6)
    assert out.sum() == 7 * 3 * 6 * 2  # the whole block fits, centred
    big = make_shape(x, target=16)
    assert big.shape == (16, 16, 16) and big.sum() == x.sum()  # larger than the image: all of it, padded


def test_keepgeom_returns_the_input_grid(weights, inputs, tmp_path):
    """FreeSurfer 8's --keepgeom: the segmentation on the input's grid (nearest, as surfa resamples it), the
    posteriors left on the 1 mm grid, the volumes from the 1 mm posteriors."""
    models = weights.need("seg2")
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    for d, extra in ((plain, []), (kept, ["--keepgeom"])):
        assert run("--i", inputs["aniso"], "--o", d / "s.nii.gz", "--post", d / "p.nii.gz", "--vol", d / "v.csv",
                   "--models", models, "--crop", "64", *extra) == 0
    src = nib.load(str(inputs["aniso"]))
    seg = nib.load(str(kept / "s.nii.gz"))
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
    assert seg.get_data_dtype() == np.dtype("<i4")  # surfa writes native little-endian int32
    one_mm = np.asanyarray(nib.load(str(plain / "s.nii.gz")).dataobj)
    kept_seg = np.asanyarray(seg.dataobj)
    # the 1x1x3 mm input's slices lie on every third 1 mm slice (centred): nearest picks them exactly
    assert set(np.unique(kept_seg).tolist()) <= set(np.unique(one_mm).tolist())
    assert (kept / "p.nii.gz").read_bytes() == (plain / "p.nii.gz").read_bytes()  # posteriors untouched
    assert (kept / "v.csv").read_text() == (plain / "v.csv").read_text()


def test_addctab_mgz_embeds_the_table(weights, inputs, tmp_path, monkeypatch):
    monkeypatch.delenv("FREESURFER_HOME", raising=False)  # this toolkit's table of the labels
    models = weights.need("seg2")
    plain, ctab = tmp_path / "plain.mgz", tmp_path / "ctab.mgz"
    assert run("--i", inputs["lia"], "--o", plain, "--models", models, "--crop", "64") == 0
    assert run("--i", inputs["lia"], "--o", ctab, "--models", models, "--crop", "64", "--addctab") == 0
    a, b = nib.load(str(plain)), nib.load(str(ctab))
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    assert read_embedded_lut(plain) is None
    table = read_embedded_lut(ctab)
    assert table[17].name == "Left-Hippocampus" and table[17].rgb == (220, 216, 20) and table[0].name == "Unknown"
    assert set(np.unique(np.asanyarray(b.dataobj)).tolist()) <= set(table)


def test_addctab_nifti_embeds_the_table_and_writes_a_sidecar(weights, inputs, tmp_path, monkeypatch):
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    seg = tmp_path / "seg.nii.gz"
    assert run("--i", inputs["ras"], "--o", seg, "--models", weights.need("seg2"), "--crop", "64",
               "--addctab") == 0
    side = tmp_path / "seg_ctab.txt"
    lines = side.read_text().splitlines()
    assert lines[0].startswith("#No. Label Name")
    entries = {int(line.split()[0]): line.split()[1:] for line in lines[1:]}
    assert entries[2] == ["Left-Cerebral-White-Matter", "245", "245", "245", "0"]
    labels = set(np.unique(np.asanyarray(nib.load(str(seg)).dataobj)).tolist())
    assert labels <= set(entries)
    embedded = read_embedded_lut(seg)  # FreeSurfer's NIfTI header extension (code 14), as surfa writes it
    assert set(embedded) == set(entries) and embedded[2].name == "Left-Cerebral-White-Matter"


def test_freesurfer_options_are_refused_for_upstream(inputs, tmp_path, capsys):
    assert main(["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz"), "--engine", "upstream",
                 "--keepgeom"]) == 2
    assert "the upstream engine runs upstream SynthSeg, which has none of them" in capsys.readouterr().err


def test_folder_batch_with_parcellation(weights, inputs, tmp_path):
    """One shared CSV for the batch: a header and one row per scan, parcel columns included."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("ras", "las"):
        (src / inputs[name].name).write_bytes(inputs[name].read_bytes())
    vol = tmp_path / "vols.csv"
    assert run("--i", src, "--o", tmp_path / "out", "--vol", vol, "--parc", "--models",
               weights.need("seg2", "parc"), "--crop", "64") == 0
    rows = list(csv.reader(open(vol)))
    assert rows[0] == expected_volume_header(parc=True)
    assert [r[0] for r in rows[1:]] == ["mni_las.nii", "mni_ras"]
    assert all(len(r) == len(rows[0]) for r in rows)
