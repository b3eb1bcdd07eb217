"""A pipeline's .env as its shell scripts mean it: assignments only, quotes, comments, CR line ends, nothing run."""

from __future__ import annotations

import pytest

from synthseg_native.batch.plan import pipeline_files, stage_files
from synthseg_native.config.envfile import parse_line, read_env_file, settings


@pytest.mark.parametrize("line, parsed", [
    ("DATA_ROOT=/data", ("DATA_ROOT", "/data")),
    ("export SID=sub-01\r", ("SID", "sub-01")),
    ("FORCE=0           # 1 re-runs", ("FORCE", "0")),
    ("FLAGS=--parc#not-a-comment", ("FLAGS", "--parc#not-a-comment")),
    ('DATA_ROOT="/Volumes/Study data" # quoted, then a comment', ("DATA_ROOT", "/Volumes/Study data")),
    ("SID='S 01'  ", ("SID", "S 01")),
    ("HOME_DIR=$HOME/x", ("HOME_DIR", "$HOME/x")),
    ("EMPTY=", ("EMPTY", "")),
    ("# DATA_ROOT=/commented", None),
    ("echo hello", None),
    ("  ", None),
    ("1BAD=x", None),
])
def test_lines(line, parsed):
    assert parse_line(line) == parsed


def test_file_with_crlf_later_lines_win_and_missing_file(tmp_path):
    env = tmp_path / ".env"
    env.write_bytes(b"# settings\r\nSID=a\r\nrm -rf /\r\nSID=b\r\nTHREADS=4")  # no final newline
    assert read_env_file(env) == {"SID": "b", "THREADS": "4"}
    assert read_env_file(tmp_path / "none") == {}


def test_environment_wins_unless_empty():
    got = settings(("A", "B", "C", "D"), {"A": "file", "B": "file", "D": ""}, {"A": "env", "B": "", "X": "1"})
    assert got == {"A": "env", "B": "file"}


@pytest.mark.parametrize("image, out, seg", [
    ("scans/t1.nii.gz", None, "scans/t1_synthseg.nii.gz"),
    ("t1.mgz", None, "t1_synthseg.nii.gz"),
    ("t1.nii", "res ults", "res ults/t1_synthseg.nii.gz"),
    ("t1.nii", "res ults/", "res ults/t1_synthseg.nii.gz"),
    ("t1.nii.gz", "x/seg.mgz", "x/seg.mgz"),
])
def test_stage_files(image, out, seg):
    files = stage_files(image, out, posteriors=True)
    base = seg.rsplit(".nii.gz", 1)[0] if seg.endswith(".nii.gz") else seg.rsplit(".mgz", 1)[0]
    assert (files.image, files.seg, files.vol, files.post) == (image, seg, base + "_vols.csv",
                                                               base + "_posteriors.nii.gz")
    assert stage_files(image, out).post is None


def test_pipeline_files():
    files = pipeline_files("/d a/ta", "sub-01")
    assert files.image == "/d a/ta/derivatives/sub-01/synthsr/sub-01_synthsr.nii.gz"
    assert files.seg == "/d a/ta/derivatives/sub-01/synthseg/sub-01_synthseg.nii.gz"
    assert files.vol == "/d a/ta/derivatives/sub-01/synthseg/sub-01_synthseg_vols.csv"
