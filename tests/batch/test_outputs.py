"""Upstream's rules for matching --i with --o/--post/--resample/--vol/--qc."""

from __future__ import annotations

import pytest

from synthseg_native.batch.plan import plan_outputs
from synthseg_native.errors import UsageError


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_single_file_to_folder_and_csv_extension(tmp_path):
    img = touch(tmp_path / "sub 1.nii.gz")
    plan = plan_outputs(str(img), str(tmp_path / "out"), vol=str(tmp_path / "vols"))
    assert plan.seg == [str(tmp_path / "out" / "sub 1_synthseg.nii.gz")]
    assert plan.vol == [str(tmp_path / "vols.csv")] and plan.shared_csv
    assert any("without .csv" in n for n in plan.notes)


def test_single_file_to_file(tmp_path):
    img = touch(tmp_path / "a.mgz")
    plan = plan_outputs(str(img), str(tmp_path / "x" / "seg.mgz"), post=str(tmp_path / "p"))
    assert plan.seg == [str(tmp_path / "x" / "seg.mgz")]
    assert plan.post == [str(tmp_path / "p" / "a_posteriors.mgz")]


def test_folder_input(tmp_path):
    for name in ("b.nii", "a.nii.gz", "c.mgz", "notes.txt"):
        touch(tmp_path / "in" / name)
    plan = plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"), resample=str(tmp_path / "res"),
                        vol=str(tmp_path / "v.csv"))
    assert [p.rsplit("/", 1)[1] for p in plan.images] == ["a.nii.gz", "b.nii", "c.mgz"]
    assert [p.rsplit("/", 1)[1] for p in plan.seg] == ["a_synthseg.nii.gz", "b_synthseg.nii", "c_synthseg.mgz"]
    assert plan.resample[2].endswith("res/c_resampled.mgz")
    assert plan.vol == [str(tmp_path / "v.csv")] * 3


def test_txt_input_requires_txt_outputs(tmp_path):
    lst = tmp_path / "in.txt"
    lst.write_text("/data/a.nii.gz\n\n/data/b.nii.gz\n")
    out = tmp_path / "out.txt"
    out.write_text("/o/a.nii.gz\n/o/b.nii.gz\n")
    plan = plan_outputs(str(lst), str(out))
    assert plan.images == ["/data/a.nii.gz", "/data/b.nii.gz"] and plan.seg == ["/o/a.nii.gz", "/o/b.nii.gz"]
    assert not plan.shared_csv
    with pytest.raises(UsageError, match="must be a .txt list"):
        plan_outputs(str(lst), str(tmp_path / "out"))
    out.write_text("/o/a.nii.gz\n")
    with pytest.raises(UsageError, match="1 entries, --i has 2"):
        plan_outputs(str(lst), str(out))


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.nii.gz"), "does not exist"),
    (lambda d: str(touch(d / "scan.img")), "unsupported extension"),
    (lambda d: str((d / "empty").mkdir() or d / "empty"), "no .nii, .nii.gz or .mgz"),
    (lambda d: str(d / "nofolder"), "input folder does not exist"),
])
def test_bad_inputs(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        plan_outputs(make(tmp_path), str(tmp_path / "out"))


def test_folder_input_with_file_output_is_refused(tmp_path):
    touch(tmp_path / "in" / "a.nii.gz")
    with pytest.raises(UsageError, match="must be a folder"):
        plan_outputs(str(tmp_path / "in"), str(tmp_path / "seg.nii.gz"))
