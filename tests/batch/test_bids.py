"""BIDS datasets in, BIDS-Derivatives names, dseg.tsv and dataset_description.json out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.batch import bids
from synthseg_native.cli import main
from synthseg_native.engine import labels as L
from synthseg_native.errors import UsageError
from synthseg_native.io import colours


def fake_bids(root: Path, scans: dict[str, Path | None]) -> Path:
    """A BIDS tree: dataset_description.json plus the given files (copied from a real scan, or empty)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "Tiny study", "BIDSVersion": "1.9.0"}))
    for rel, source in scans.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes() if source else b"")
    return root


TREE = {
    "sub-01/anat/sub-01_T1w.nii.gz": None,
    "sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-1_T1w.nii.gz": None,
    "sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-2_T1w.nii": None,
    "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz": None,  # another contrast: only with --bids-suffix T2w
    "sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz": None,  # not anatomical
    "sub-01/anat/sub-01_T1w.json": None,  # sidecar, not an image
    "derivatives/other/sub-01/anat/sub-01_T1w.nii.gz": None,  # someone else's derivative
}


def test_plan_names_follow_bids_derivatives(tmp_path):
    root = fake_bids(tmp_path / "raw", TREE)
    out = root / "derivatives" / "synthseg"
    plan = bids.plan_bids(str(root), str(out), post=str(out), resample=str(tmp_path / "res"),
                          vol=str(out / "volumes.csv"))
    rel = [str(Path(p).relative_to(out)) for p in plan.seg]
    assert rel == ["sub-01/anat/sub-01_desc-synthseg_dseg.nii.gz",
                   "sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-1_desc-synthseg_dseg.nii.gz",
                   "sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-2_desc-synthseg_dseg.nii.gz"]
    assert plan.post[0] == str(out / "sub-01/anat/sub-01_desc-synthseg_probseg.nii.gz")
    assert plan.resample[2] == str(tmp_path / "res/sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-2_desc-resampled_T1w"
                                   ".nii.gz")
    assert plan.vol == [str(out / "volumes.csv")] * 3 and plan.shared_csv
    assert plan.names == ["sub-01_T1w", "sub-02_ses-1_acq-mprage_run-1_T1w", "sub-02_ses-1_acq-mprage_run-2_T1w"]
    assert plan.bids_root == str(root)
    t2 = bids.plan_bids(str(root), str(out), suffixes=["T2w"])
    assert [Path(p).name for p in t2.seg] == ["sub-02_ses-1_desc-synthseg_dseg.nii.gz"]


@pytest.mark.parametrize("kind, message", [
    ("root", "must not be the raw BIDS dataset"),
    ("image", "must be a folder"),
    ("empty", "without sub-*"),
    ("clash", "select one contrast"),
])
def test_plan_errors(tmp_path, kind, message):
    tree = dict(TREE)
    if kind == "clash":
        tree["sub-03/anat/sub-03_T1w.nii.gz"] = tree["sub-03/anat/sub-03_T2w.nii.gz"] = None
    root = fake_bids(tmp_path / "raw", {} if kind == "empty" else tree)
    out = {"root": root, "image": tmp_path / "seg.nii.gz"}.get(kind, tmp_path / "deriv")
    with pytest.raises(UsageError, match=message.replace("*", r"\*")):
        bids.plan_bids(str(root), str(out), suffixes=["T1w", "T2w"] if kind == "clash" else ["T1w"])


def test_bids_needs_the_native_engine(tmp_path, capsys):
    root = fake_bids(tmp_path / "raw", TREE)
    assert main(["--i", str(root), "--o", str(tmp_path / "deriv"), "--engine", "upstream"]) == 2
    assert "BIDS datasets need the native engine" in capsys.readouterr().err


def test_dseg_tsv_has_every_label_with_freesurfer_colour():
    lines = bids.dseg_tsv().splitlines()
    assert lines[0] == "index\tname\tcolor"
    table = {int(i): (n, c) for i, n, c in (line.split("\t") for line in lines[1:])}
    assert set(table) == set(L.LabelSet.build().labels.tolist())
    assert table[17] == ("Left-Hippocampus", "#dcd814") and table[0][0] == "Unknown"
    assert table[24] == ("CSF", "#3c3c3c")
    v1 = {int(line.split("\t")[0]) for line in bids.dseg_tsv(v1=True).splitlines()[1:]}
    assert 24 not in v1 and 17 in v1
    parc = {int(line.split("\t")[0]) for line in bids.dseg_tsv(parc=True).splitlines()[1:]}
    assert {1001, 1035, 2002} <= parc and 1004 not in parc
    for idx in parc:
        name, r, g, b = colours.lookup_table(True)[idx]
        assert f"#{r:02x}{g:02x}{b:02x}" in bids.dseg_tsv(parc=True)


def test_bids_dataset_end_to_end(weights, inputs, tmp_path):
    root = fake_bids(tmp_path / "raw", {
        "sub-01/anat/sub-01_T1w.nii.gz": inputs["ras"],
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii": inputs["las"],
        "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz": inputs["ras"],
    })
    out = root / "derivatives" / "synthseg"
    assert main(["--i", str(root), "--o", str(out), "--vol", str(out / "volumes.csv"), "--models",
                 str(weights.need("seg2")), "--crop", "64", "--threads", "2"]) == 0
    segs = sorted(str(p.relative_to(out)) for p in out.rglob("*_dseg.nii.gz"))
    assert segs == ["sub-01/anat/sub-01_desc-synthseg_dseg.nii.gz",
                    "sub-02/ses-1/anat/sub-02_ses-1_desc-synthseg_dseg.nii.gz"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "synthseg-native" and desc["Name"].endswith("Tiny study")
    indices = {int(line.split("\t")[0]) for line in (out / "dseg.tsv").read_text().splitlines()[1:]}
    for seg in out.rglob("*_dseg.nii.gz"):
        assert set(np.unique(np.asanyarray(nib.load(str(seg)).dataobj)).tolist()) <= indices
    with open(out / "volumes.csv", newline="") as fh:
        assert [r[0] for r in csv.reader(fh)][1:] == ["sub-01_T1w", "sub-02_ses-1_T1w.nii"]
