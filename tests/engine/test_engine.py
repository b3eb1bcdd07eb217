"""End-to-end runs of the native engine on small real MRI with seeded test weights."""

from __future__ import annotations

import csv
import hashlib

import nibabel as nib
import numpy as np
import pytest

from engine_fixtures import reference
from synthseg_native.cli import main
from synthseg_native.engine import labels as L

CROP = ["--crop", "64"]


def run(*args: str) -> int:
    return main([str(a) for a in args] + ["--threads", "2"])


def seg_of(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_default_outputs_in_input_space(weights, inputs, tmp_path):
    models = weights.need("seg2")
    out, post, vol = tmp_path / "seg.nii.gz", tmp_path / "post.nii.gz", tmp_path / "vol.csv"
    assert run("--i", inputs["ras"], "--o", out, "--post", post, "--vol", vol, "--models", models) == 0
    src = nib.load(str(inputs["ras"]))
    seg, aff = seg_of(out)
    assert seg.shape == src.shape and np.allclose(aff, src.affine)
    assert nib.load(str(out)).get_data_dtype() == np.int32
    found = set(np.unique(seg).tolist())
    assert found <= set(L.LabelSet.build().labels.tolist())
    assert len(found) >= 5, f"calibrated test weights should give several labels, got {sorted(found)}"
    p = np.asanyarray(nib.load(str(post)).dataobj)
    assert p.shape == (*src.shape, 33) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    rows = list(csv.reader(open(vol)))
    names = reference("synthseg_segmentation_names_2.0")
    labels = reference("synthseg_segmentation_labels_2.0")
    _, idx = np.unique(labels, return_index=True)
    expected = names[idx].tolist()[1:]
    assert rows[0] == ["subject", "total intracranial"] + expected
    assert rows[1][0] == "mni_ras" and len(rows[1]) == len(rows[0])
    vols = np.array(rows[1][1:], dtype=float)
    assert vols[0] == pytest.approx(vols[1:].sum(), abs=0.05)
    # volumes are the posterior sums at 1 mm, rounded to 3 decimals; upstream sums in float32 over a strided
    # view (no pairwise summation), which is off by up to ~0.05 % on large structures
    assert vols[1:] == pytest.approx(p[..., 1:].sum((0, 1, 2), dtype=np.float64), rel=1e-3, abs=2e-3)


@pytest.mark.parametrize("name", ["las", "lia", "4d"])
def test_orientation_and_format_do_not_change_the_result(weights, inputs, tmp_path, name):
    """Alignment to RAS is an exact axis permutation, so results are the same voxels, reoriented."""
    models = weights.need("seg2")
    ext = ".mgz" if name == "lia" else ".nii.gz"
    ref, other = tmp_path / "ref.nii.gz", tmp_path / f"other{ext}"
    assert run("--i", inputs["ras"], "--o", ref, "--models", models, *CROP) == 0
    assert run("--i", inputs[name], "--o", other, "--models", models, *CROP) == 0
    ref_img, other_img = nib.load(str(ref)), nib.load(str(other))
    src = nib.load(str(inputs[name]))
    assert other_img.shape == src.shape[:3]
    assert np.allclose(other_img.affine, src.affine)
    back = other_img.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(other_img.affine), nib.orientations.io_orientation(ref_img.affine)))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(ref_img.dataobj))


def test_oblique_input_keeps_its_affine(weights, inputs, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert run("--i", inputs["oblique"], "--o", out, "--models", weights.need("seg2"), *CROP) == 0
    src = nib.load(str(inputs["oblique"]))
    seg, aff = seg_of(out)
    assert seg.shape == src.shape and np.allclose(aff, src.affine)


def test_anisotropic_input_is_resampled_to_1mm(weights, inputs, tmp_path):
    out, res = tmp_path / "seg.nii.gz", tmp_path / "res.nii.gz"
    assert run("--i", inputs["aniso"], "--o", out, "--resample", res, "--models", weights.need("seg2"),
               *CROP) == 0
    src = nib.load(str(inputs["aniso"]))
    seg_img, res_img = nib.load(str(out)), nib.load(str(res))
    assert seg_img.shape == res_img.shape == (72, 88, 78)  # 26 slices of 3 mm
    assert np.allclose(np.linalg.norm(seg_img.affine[:3, :3], axis=0), 1.0)
    # the centre of the volume stays in place
    centre_src = src.affine @ np.r_[(np.array(src.shape) - 1) / 2, 1]
    centre_out = seg_img.affine @ np.r_[(np.array(seg_img.shape) - 1) / 2, 1]
    assert np.allclose(centre_src, centre_out, atol=1.01)


def test_low_resolution_scan_default_padding(weights, inputs, tmp_path):
    """nibabel's 2 mm anatomical scan: resampled, padded to 128³, full default (flip + topology) path."""
    out = tmp_path / "seg.nii.gz"
    assert run("--i", inputs["anatomical"], "--o", out, "--models", weights.need("seg2")) == 0
    assert nib.load(str(out)).shape == (66, 82, 50)


@pytest.mark.parametrize("flags", [["--fast"], ["--ct"], ["--v1"], ["--robust"]])
def test_model_variants_run(weights, inputs, tmp_path, flags):
    keys = {"--v1": "seg1", "--robust": "robust"}.get(flags[0], "seg2")
    out, vol = tmp_path / "seg.nii.gz", tmp_path / "vol.csv"
    assert run("--i", inputs["ras"], "--o", out, "--vol", vol, "--models", weights.need(keys), *flags,
               *CROP) == 0
    seg, _ = seg_of(out)
    v1 = flags == ["--v1"]
    assert set(np.unique(seg).tolist()) <= set(L.LabelSet.build(v1).labels.tolist())
    header = next(csv.reader(open(vol)))
    assert (header[1] == "total intracranial") is (not v1)
    assert len(header) == (32 if v1 else 34)  # subject + (total) + one column per non-background label


def test_fast_differs_from_default_only_by_postprocessing(weights, inputs, tmp_path):
    models = weights.need("seg2")
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert run("--i", inputs["ras"], "--o", a, "--models", models, *CROP) == 0
    assert run("--i", inputs["ras"], "--o", b, "--models", models, "--fast", *CROP) == 0
    sa, sb = seg_of(a)[0], seg_of(b)[0]
    assert sa.shape == sb.shape and not np.array_equal(sa, sb)


def test_two_runs_are_byte_identical(weights, inputs, tmp_path):
    models = weights.need("seg2")
    outs = []
    for k in range(2):
        d = tmp_path / str(k)
        assert run("--i", inputs["ras"], "--o", d / "s.nii.gz", "--post", d / "p.nii.gz", "--vol", d / "v.csv",
                   "--models", models, *CROP) == 0
        outs.append([md5(d / f) for f in ("s.nii.gz", "p.nii.gz", "v.csv")])
    assert outs[0] == outs[1]


def test_folder_batch_with_one_bad_file(weights, inputs, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("ras", "lia"):
        (src / inputs[name].name).write_bytes(inputs[name].read_bytes())
    (src / "broken.nii.gz").write_bytes(b"not an image at all")
    out, vol = tmp_path / "out", tmp_path / "vols.csv"
    rc = run("--i", src, "--o", out, "--vol", vol, "--models", weights.need("seg2"), *CROP)
    assert rc == 1
    err = capsys.readouterr().err
    assert "[ERR] " in err and "broken.nii.gz" in err
    assert err.count("seeded random test weights") == 1  # said once per batch, not per image
    assert sorted(p.name for p in out.iterdir()) == ["mni_lia_synthseg.mgz", "mni_ras_synthseg.nii.gz"]
    rows = list(csv.reader(open(vol)))
    assert rows[0][0] == "subject" and [r[0] for r in rows[1:]] == ["mni_lia.mgz", "mni_ras"]


def test_txt_list_batch(weights, inputs, tmp_path, capsys):
    ins, outs, vols = tmp_path / "in.txt", tmp_path / "out.txt", tmp_path / "vol.txt"
    ins.write_text(f"{inputs['ras']}\n\n{tmp_path / 'missing.nii.gz'}\n")
    outs.write_text(f"{tmp_path / 'a.nii.gz'}\n{tmp_path / 'b.nii.gz'}\n")
    vols.write_text(f"{tmp_path / 'a.csv'}\n{tmp_path / 'b.csv'}\n")
    rc = run("--i", ins, "--o", outs, "--vol", vols, "--models", weights.need("seg2"), *CROP)
    assert rc == 1
    assert "missing.nii.gz" in capsys.readouterr().err
    assert (tmp_path / "a.nii.gz").is_file() and not (tmp_path / "b.nii.gz").exists()
    rows = list(csv.reader(open(tmp_path / "a.csv")))
    assert rows[0][0] == "" and rows[0][1] == "total intracranial" and rows[1][0] == "mni_ras"
    assert not (tmp_path / "b.csv").exists()


def test_missing_weights_name_every_place_searched(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SYNTHSEG_MODELS", str(tmp_path / "env_models"))
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / "fs"))
    monkeypatch.chdir(tmp_path)
    rc = run("--i", inputs["ras"], "--o", tmp_path / "s.nii.gz")
    assert rc == 1
    err = capsys.readouterr().err
    for where in ("env_models", "./models", "fs/models", "FREESURFER_HOME"):
        assert where in err
    assert not (tmp_path / "s.nii.gz").exists()


def test_an_explicit_models_folder_is_the_only_place(inputs, tmp_path, capsys, monkeypatch, weights):
    """A typo in --models is an error naming it, even where $SYNTHSEG_MODELS holds usable weights."""
    monkeypatch.setenv("SYNTHSEG_MODELS", str(weights.need("seg2")))
    rc = run("--i", inputs["ras"], "--o", tmp_path / "s.nii.gz", "--models", tmp_path / "nowhere")
    assert rc == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"[ERR] --models {tmp_path / 'nowhere'}: no such folder"), err
    assert not (tmp_path / "s.nii.gz").exists()


@pytest.mark.parametrize("argv, message", [
    (["--robust", "--v1"], "--robust cannot be used with --v1"),
    (["--crop", "64", "64"], "--crop takes 1 or 3"),
    (["--o", "x.txt"], ".txt list when --i is a .txt list"),
])
def test_invalid_flag_combinations(inputs, tmp_path, capsys, argv, message):
    base = ["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz")]
    if "--o" in argv:
        base = ["--i", str(inputs["ras"])]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_scan_with_few_slices_is_segmented(weights, mni_img, tmp_path, capsys):
    """Upstream crashes on scans with <= 10 slices (it reads only two voxel sizes); we warn and segment."""
    data = np.asarray(mni_img.dataobj)[60:132, 70:158, 80:160:10].astype(np.float32)  # 8 slices, 10 mm apart
    aff = mni_img.affine.copy()
    aff[:3, 2] *= 10
    src = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(src))
    out = tmp_path / "seg.nii.gz"
    assert run("--i", src, "--o", out, "--models", weights.need("seg2"), "--fast", *CROP) == 0
    assert "very few slices" in capsys.readouterr().err
    assert nib.load(str(out)).shape[:2] == (72, 88)


def test_timings_merge_sums_seconds_and_keeps_each_stages_own_peak():
    """A batch merges each scan's record when the scan is done (scans overlap): the peak memory of a stage must
    stay the one measured when that stage ended, not the process's peak at the time of the merge."""
    from synthseg_native.engine.runtime import Timings

    batch, scan = Timings(), Timings()
    batch.stages, batch.peak_gb, batch.network_flop = {"load_weights": 1.0, "network": 2.0}, \
        {"load_weights": 0.7, "network": 5.0}, 10
    scan.stages, scan.peak_gb, scan.network_flop = {"network": 3.0, "write": 0.5}, {"network": 4.0, "write": 6.0}, 5
    batch.merge(scan)
    assert batch.stages == {"load_weights": 1.0, "network": 5.0, "write": 0.5}
    assert batch.peak_gb == {"load_weights": 0.7, "network": 5.0, "write": 6.0}
    assert batch.network_flop == 15
