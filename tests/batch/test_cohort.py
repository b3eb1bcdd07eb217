"""Batches of scans: one model build per batch, resume through provenance, exact shards, progress lines."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from pathlib import Path

import pytest

from synthseg_native.batch import shards
from synthseg_native.batch.plan import plan_outputs, scan_names
from synthseg_native.batch.progress import Progress, fmt_seconds
from synthseg_native.cli import main
from synthseg_native.config import parse_shard
from synthseg_native.engine.backends.tf import network
from synthseg_native.errors import UsageError

CROP = ["--crop", "64"]


def run(*args) -> int:
    return main([str(a) for a in args] + ["--threads", "2"])


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def segs_in(folder: Path) -> list[Path]:
    """The segmentations in ``folder`` (not their provenance records)."""
    return sorted(p for p in folder.glob("*_synthseg.*") if not p.name.endswith(".json"))


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts how often the segmentation U-Net is constructed."""
    calls: list[int] = []
    real = network.unet_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(network, "unet_model", counting)
    return calls


@pytest.fixture
def folder(scan_folder) -> Path:
    return scan_folder


def rows(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# -- shards -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 3, 7, 10])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 11])
def test_shards_partition_the_list_exactly(count, n):
    parts = [shards.shard_indices(count, i, n) for i in range(1, n + 1)]
    flat = [k for part in parts for k in part]
    assert sorted(flat) == list(range(count)) and len(flat) == len(set(flat))  # every scan once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert parts == [shards.shard_indices(count, i, n) for i in range(1, n + 1)]  # deterministic


def test_shard_plans_split_a_folder_and_its_tables(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz", "c.mgz", "d.nii", "e.nii.gz"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"")
    plan = plan_outputs(str(tmp_path / "in"), str(tmp_path / "out"), vol=str(tmp_path / "v.csv"))
    parts = [shards.shard_plan(plan, i, 2) for i in (1, 2)]
    assert sorted(parts[0].images + parts[1].images) == plan.images
    assert not set(parts[0].images) & set(parts[1].images)
    assert parts[0].vol == [str(tmp_path / "v.shard-1-of-2.csv")] * 3
    assert parts[1].vol == [str(tmp_path / "v.shard-2-of-2.csv")] * 2
    assert shards.unshard_csv(parts[1].vol[0]) == str(tmp_path / "v.csv")
    assert parts[1].names == [plan.names[1], plan.names[3]] and parts[1].shard == (2, 2)
    assert shards.shard_plan(plan, 1, 1).vol == plan.vol  # one shard: the table itself


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "2", ""])
def test_bad_shard_is_a_usage_error(text, inputs, tmp_path, capsys):
    with pytest.raises(UsageError):
        parse_shard(text)
    if text:
        assert main(["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz"), "--shard", text]) == 2
        assert "--shard" in capsys.readouterr().err


def test_scan_names_are_unique_and_readable(tmp_path):
    segs = [f"{tmp_path}/out/sub-1/seg.nii.gz", f"{tmp_path}/out/sub-2/seg.nii.gz"]
    assert scan_names(segs) == ["sub-1_seg", "sub-2_seg"]
    assert scan_names([f"{tmp_path}/a_synthseg.nii", f"{tmp_path}/a_synthseg.nii.gz"]) == \
        ["a_synthseg", "a_synthseg-2"]


# -- one model per batch, resume ----------------------------------------------------------------------------

def test_model_built_once_for_a_batch(weights, folder, tmp_path, builds, capsys):
    out = tmp_path / "out"
    assert run("--i", folder, "--o", out, "--models", weights.need("seg2"), *CROP) == 0
    assert len(builds) == 1
    assert len(list(segs_in(out))) == 3
    log = capsys.readouterr().out
    done = [line for line in log.splitlines() if line.startswith("[DONE] ")]
    assert len(done) == 3 and all("network " in line and "postprocess " in line for line in done)
    assert "[INFO] progress 3/3 (100 %)" in log and "ETA" in log
    assert not list(out.glob("*.provenance.json"))  # without --resume the folder looks like upstream's


def test_resume_skips_finished_scans(weights, folder, tmp_path, builds, capsys, mni_img):
    import nibabel as nib

    from engine_fixtures import crop_img

    out, vol, qc = tmp_path / "out", tmp_path / "out" / "vols.csv", tmp_path / "qc"
    args = ["--i", folder, "--o", out, "--vol", vol, "--snapshot", qc, "--resume",
            "--models", weights.need("seg2"), *CROP]
    assert run(*args) == 0
    first = rows(vol)
    assert [r[0] for r in first[1:]] == ["mni_las.nii", "mni_lia.mgz", "mni_ras"]
    segs = sorted(segs_in(out))
    assert len(list(out.glob("*.provenance.json"))) == 3
    digests = {p.name: md5(p) for p in segs}
    capsys.readouterr()

    # one input changes: only that scan runs, with one model build; the table keeps the others' rows, in order
    nib.save(crop_img(mni_img, (61, 71, 56), (72, 88, 76)), str(folder / "mni_ras.nii.gz"))
    builds.clear()
    assert run(*args) == 0
    log = capsys.readouterr().out
    assert log.count("[SKIP] ") == 2 and "mni_ras.nii.gz: running again because input changed" in log
    assert log.count("[RUN ] ") == 1 and len(builds) == 1
    second = rows(vol)
    assert second[:3] == first[:3] and second[3][0] == "mni_ras" and second[3] != first[3]
    assert {p.name: md5(p) for p in segs if "ras" not in p.name} == \
        {k: v for k, v in digests.items() if "ras" not in k}

    page = (qc / "index.html").read_text()
    assert "Last run: <b>1 segmented, 2 current (skipped by --resume), 0 failed</b>" in page  # as the terminal said
    assert "batch: 1 segmented, 2 current (skipped), 0 failed" in log

    # nothing changed: nothing runs and the model is not even built
    builds.clear()
    assert run(*args) == 0
    log = capsys.readouterr().out
    assert log.count("[SKIP] ") == 3 and "[RUN ]" not in log and builds == []
    assert rows(vol) == second
    assert "Last run: <b>0 segmented, 3 current (skipped by --resume), 0 failed</b>" in (qc / "index.html").read_text()

    # a scan whose row left the shared table is segmented again
    vol.write_text("".join(",".join(r) + "\n" for r in second[:-1]))
    assert run(*args) == 0
    assert capsys.readouterr().out.count("[RUN ] ") == 1 and rows(vol) == second


def test_resume_retries_a_failed_scan(weights, folder, tmp_path, capsys):
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    args = ["--i", folder, "--o", tmp_path / "out", "--resume", "--models", weights.need("seg2"), *CROP]
    assert run(*args) == 1
    capsys.readouterr()
    assert run(*args) == 1
    captured = capsys.readouterr()
    assert captured.out.count("[SKIP] ") == 3 and "[RUN ] 1/4 " in captured.out and "broken.nii.gz" in captured.err
    assert "1 failed" in captured.out


def test_sharded_batch_equals_one_batch(weights, folder, tmp_path, capsys):
    """Two shards plus `finish` give the same files, and the same table, as one batch."""
    models = weights.need("seg2")
    one, two = tmp_path / "one", tmp_path / "two"
    assert run("--i", folder, "--o", one, "--vol", one / "v.csv", "--models", models, *CROP) == 0
    engine = ["--i", str(folder), "--o", str(two), "--vol", str(two / "v.csv"), "--resume", "--models", str(models),
              *CROP]
    for i in (1, 2):
        assert run(*engine, "--shard", f"{i}/2") == 0
    assert sorted(p.name for p in two.glob("v*.csv")) == ["v.shard-1-of-2.csv", "v.shard-2-of-2.csv"]
    assert main(["cohort", "finish", "--shards", "2", "--", *engine]) == 0
    assert sorted(p.name for p in two.glob("v*.csv")) == ["v.csv"]
    assert md5(one / "v.csv") == md5(two / "v.csv")
    for seg in one.glob("*_synthseg.*"):
        assert md5(seg) == md5(two / seg.name)
    # merging again (shard files gone) keeps every row
    assert main(["cohort", "finish", "--shards", "2", "--", *engine]) == 0
    assert md5(one / "v.csv") == md5(two / "v.csv")


# -- progress -----------------------------------------------------------------------------------------------

def test_progress_lines_with_eta_off_a_terminal(capsys):
    p = Progress(3, stream=io.StringIO())
    assert p.bar is None and p.eta() is None
    p.update(True)
    p.update(False)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("[INFO] ") for line in lines)
    assert lines[0].startswith("[INFO] progress 1/3 (33 %)") and "ETA" in lines[0]
    assert lines[1].startswith("[INFO] progress 2/3 (66 %)") and p.failed == 1


def test_progress_bar_on_a_terminal(capsys):
    stream = io.StringIO()
    p = Progress(2, stream=stream, bar=True)
    p.update(True)
    logging.getLogger("synthseg_native.batch").info("a line while the bar is drawn")
    p.close()
    assert "SynthSeg 1/2" in stream.getvalue() and "ETA" in stream.getvalue()
    assert capsys.readouterr().out == "[INFO] a line while the bar is drawn\n"  # above the bar, no progress lines


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
