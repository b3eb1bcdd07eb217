"""``make diff``: identical results pass; a few flipped voxels, shifted grids, posterior or volume
differences beyond tolerance fail with a report that says which. Small synthetic volumes stand in
for segmentations, since the comparison only reads files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.tools.compare import main

AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
HEADER = "subject,total intracranial,left cerebral white matter,left cerebral cortex\n"


def _seg(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice([0, 2, 3, 4, 17, 41, 42, 1003], size=(24, 20, 16)).astype(np.int32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    klass = nib.MGHImage if path.suffix == ".mgz" else nib.Nifti1Image
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(klass(data, affine), str(path))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _save(tmp_path / "nat" / "s_synthseg.nii.gz", _seg()), _save(tmp_path / "ref" / "s.nii.gz", _seg())


def _run(*args: object) -> int:
    return main([str(a) for a in args])


def test_identical_pass_and_default_report_under_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a = _save(tmp_path / "native" / "x_synthseg.nii.gz", _seg())
    b = _save(tmp_path / "docker" / "x_synthseg.nii.gz", _seg())
    assert _run(a, b) == 0
    out = capsys.readouterr().out
    assert "[DONE]" in out
    reports = list((tmp_path / "results" / "diff").glob("*.md"))
    assert len(reports) == 1 and reports[0].name.endswith("-native-x_synthseg-vs-docker-x_synthseg.md")
    text = reports[0].read_text()
    assert "verdict: **PASS**" in text and "voxels that differ: **0**" in text
    assert "| 17 | left hippocampus |" in text and "| 1003 | ctx-lh-caudalmiddlefrontal |" in text


def test_mgz_and_nifti_of_same_labels_agree(tmp_path):
    a = _save(tmp_path / "a.nii", _seg())
    b = _save(tmp_path / "b.mgz", _seg())  # stored big-endian: still the same dtype
    assert _run(a, b, "--report", tmp_path / "r.md") == 0


def test_few_voxels_fail_by_default_and_pass_with_tolerances(tmp_path, capsys):
    a, b = _seg(), _seg()
    b[3, 4, 5:8] = 42
    n = int(np.count_nonzero(a != b))
    pa, pb = _save(tmp_path / "a.nii.gz", a), _save(tmp_path / "b.nii.gz", b)
    report = tmp_path / "sub dir" / "report ü.md"
    assert _run(pa, pb, "--report", report) == 1
    out = capsys.readouterr()
    assert f"[ERR] results differ beyond the exact tolerance: {n} voxels differ" in out.err
    assert "add --tolerance float32 (make diff DIFF_FLAGS='--tolerance float32'" in out.out  # the hint
    text = report.read_text()
    assert f"voxels that differ: **{n}**" in text and "verdict: **FAIL**" in text
    assert _run(pa, pb, "--report", report, "--max-voxel-diff", n, "--min-dice", "0.9") == 0
    assert _run(pa, pb, "--report", report, "--max-voxel-diff", n, "--min-dice", "0.99999") == 1
    assert "Dice below 0.99999 for label(s)" in report.read_text()


def test_misaligned_images_fail_without_voxel_checks(tmp_path, capsys):
    shifted = AFFINE.copy()
    shifted[:3, 3] += [1.0, 0, 0]
    a, b = _save(tmp_path / "a.nii.gz", _seg()), _save(tmp_path / "b.nii.gz", _seg(), shifted)
    assert _run(a, b, "--report", tmp_path / "r.md") == 1
    assert "misaligned" in capsys.readouterr().err
    text = (tmp_path / "r.md").read_text()
    assert "Voxel-wise checks skipped" in text and "## Labels" not in text


def test_shape_and_dtype_differences_fail(tmp_path, capsys):
    a = _save(tmp_path / "a.nii.gz", _seg())
    b = _save(tmp_path / "b.nii.gz", _seg()[:, :, :8])
    c = _save(tmp_path / "c.nii.gz", _seg().astype(np.int16))
    assert _run(a, b, "--report", tmp_path / "r.md") == 1
    assert "shapes differ" in capsys.readouterr().err
    assert _run(a, c, "--report", tmp_path / "r.md") == 1
    assert "dtypes differ: int32 vs int16" in capsys.readouterr().err


def test_posteriors_max_difference(tmp_path, pair, capsys):
    rng = np.random.default_rng(1)
    post = rng.random((24, 20, 16, 5)).astype(np.float32)
    pa = _save(tmp_path / "pa.nii.gz", post)
    near = _save(tmp_path / "pb.nii.gz", post + np.float32(5e-7))
    far = post.copy()
    far[1, 2, 3, 4] += 0.25
    pfar = _save(tmp_path / "pc.nii.gz", far)
    r = tmp_path / "r.md"
    assert _run(*pair, "--post-a", pa, "--post-b", near, "--report", r) == 0
    assert "## Posteriors" in r.read_text()
    assert _run(*pair, "--post-a", pa, "--post-b", pfar, "--report", r) == 1
    assert "posteriors differ by up to 0.25" in capsys.readouterr().err
    assert _run(*pair, "--post-a", pa, "--post-b", near, "--max-post-diff", "1e-7", "--report", r) == 1
    wrong = _save(tmp_path / "pd.nii.gz", post[..., :4])
    assert _run(*pair, "--post-a", pa, "--post-b", wrong, "--report", r) == 1


def test_float32_tolerance_for_backends(tmp_path, capsys):
    """Two backends: a few flipped near-ties and rounding-sized posterior differences pass ``--tolerance float32``
    (the documented bounds), fail the exact default, and a real difference fails both."""
    rng = np.random.default_rng(2)
    seg = rng.integers(0, 5, (60, 60, 60)).astype(np.int32)  # 216,000 voxels: 21 may differ at 1e-4
    flipped = seg.copy()
    flipped.reshape(-1)[:20] += 1
    post = rng.random((60, 60, 60, 3)).astype(np.float32)
    rounded = post + np.float32(3e-5)
    rounded.reshape(-1)[:50] += 0.5  # posteriors of flipped voxels move a lot: 50 of 648,000 values
    va, vb = tmp_path / "a.csv", tmp_path / "b.csv"
    va.write_text(HEADER + "s,1500000.123,250000.5,300000.25\n")
    vb.write_text(HEADER + "s,1500001.2,250000.5,300000.25\n")
    a, b = _save(tmp_path / "a.nii.gz", seg), _save(tmp_path / "b.nii.gz", flipped)
    pa, pb = _save(tmp_path / "pa.nii.gz", post), _save(tmp_path / "pb.nii.gz", rounded)
    files = [a, b, "--post-a", pa, "--post-b", pb, "--vol-a", va, "--vol-b", vb, "--report", tmp_path / "r.md"]
    assert _run(*files) == 1
    assert _run(*files, "--tolerance", "float32") == 0, capsys.readouterr()
    text = (tmp_path / "r.md").read_text()
    assert "tolerance 21 (0.01 %): ok" in text and "(tolerance 0.01 %): ok" in text
    more = flipped.copy()
    more.reshape(-1)[:30] += 1
    c = _save(tmp_path / "c.nii.gz", more)
    assert _run(a, c, "--tolerance", "float32", "--report", tmp_path / "r.md") == 1
    assert "results differ beyond the float32 tolerance: 30 voxels differ" in capsys.readouterr().err


def test_volume_columns_compared(tmp_path, pair, capsys):
    va, vb, vc = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    va.write_text(HEADER + "s,1500000.123,250000.5,300000.25\n")
    vb.write_text(HEADER + "s,1500000.123,250000.505,300000.25\n")
    vc.write_text("subject,total intracranial,left cerebral white matter\ns,1500000.123,250000.5\n")
    r = tmp_path / "r.md"
    assert _run(*pair, "--vol-a", va, "--vol-b", vb, "--report", r) == 0
    assert _run(*pair, "--vol-a", va, "--vol-b", vb, "--max-vol-diff", "0.001", "--report", r) == 1
    assert "volumes differ by up to 0.005" in capsys.readouterr().err
    assert "| left cerebral white matter | 250000.5 | 250000.505 | 0.005 ✗ |" in r.read_text()
    assert _run(*pair, "--vol-a", va, "--vol-b", vc, "--report", r) == 1
    assert "volume columns differ: left cerebral cortex" in capsys.readouterr().err


def test_unreadable_input_is_one_err_line(tmp_path, pair, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    assert _run(pair[0], bad, "--report", tmp_path / "r.md") == 1
    err = capsys.readouterr().err
    assert err.startswith("[ERR] ") and "broken.nii.gz: cannot read" in err and "Traceback" not in err
    assert _run(pair[0], tmp_path / "x.txt") == 1
    assert not (tmp_path / "r.md").exists()


def test_unpaired_posteriors_are_a_usage_error(pair):
    with pytest.raises(SystemExit) as exc:
        _run(*pair, "--post-a", pair[0])
    assert exc.value.code == 2
