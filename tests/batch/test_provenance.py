"""The stage's cache: a run may be skipped only when its sidecar proves the outputs came from the same
input content, result-relevant flags, weights and toolkit; anything else deletes the sidecar and
asks for a run. Small stand-in files are enough: provenance only hashes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from synthseg_native.batch import provenance as P
from synthseg_native.cli import main


@pytest.fixture
def run(tmp_path: Path, monkeypatch) -> dict:
    """A finished run's files: input, fake weights, segmentation and volumes, in folders with spaces."""
    monkeypatch.delenv("SYNTHSEG_MODELS", raising=False)
    d = tmp_path / "sub ject é"
    (d / "models").mkdir(parents=True)
    (d / "models" / "synthseg_2.0.h5").write_bytes(b"weights v1")
    (d / "in.nii.gz").write_bytes(b"image bytes")
    (d / "out").mkdir()
    seg, vol = d / "out" / "in_synthseg.nii.gz", d / "out" / "in_synthseg_vols.csv"
    seg.write_bytes(b"segmentation")
    vol.write_text("subject,total intracranial\nin,1.0\n")
    args = ["--i", str(d / "in.nii.gz"), "--o", str(seg), "--vol", str(vol), "--models", str(d / "models")]
    return {"dir": d, "seg": seg, "vol": vol, "args": args, "sidecar": Path(str(seg) + ".provenance.json")}


def check(args: list[str], *opts: str) -> int:
    return main(["provenance", "check", *opts, "--", *args])


def write(args: list[str]) -> int:
    return main(["provenance", "write", "--", *args])


def test_no_sidecar_means_run(run, capsys):
    assert check(run["args"]) == P.EXIT_STALE
    assert "[INFO] cache: running because no provenance record in_synthseg.nii.gz.provenance.json" in \
        capsys.readouterr().out


def test_written_sidecar_skips_and_records_what_matters(run, capsys):
    assert write(run["args"]) == 0
    rec = json.loads(run["sidecar"].read_text())
    assert rec["input"]["path"] == str(run["dir"] / "in.nii.gz") and rec["input"]["size"] == 11
    assert len(rec["input"]["sha256"]) == 64 and rec["input"]["mtime_ns"] > 0
    assert list(rec["weights"]) == ["synthseg_2.0.h5"]
    assert rec["engine"] == "native" and rec["flags"]["crop"] is None and "threads" not in rec["flags"]
    assert set(rec["outputs"]) == {str(run["seg"]), str(run["vol"])}
    assert rec["toolkit"]["version"] and len(rec["toolkit"]["sources_sha256"]) == 64
    capsys.readouterr()
    assert check(run["args"]) == P.EXIT_CURRENT
    assert capsys.readouterr().out.startswith("[SKIP] ")
    assert sorted(p.name for p in run["seg"].parent.iterdir()) == sorted(
        [run["seg"].name, run["vol"].name, run["sidecar"].name])  # no temp file left behind


def test_threads_touch_and_moved_weights_do_not_invalidate(run):
    write(run["args"])
    os.utime(run["dir"] / "in.nii.gz", ns=(1, 1))
    moved = run["dir"] / "elsewhere"
    (run["dir"] / "models").rename(moved)
    args = run["args"][:-1] + [str(moved), "--threads", "7", "--profile"]
    assert check(args) == P.EXIT_CURRENT


@pytest.mark.parametrize("change, reason", [
    (lambda r: (r["dir"] / "in.nii.gz").write_bytes(b"image BYTES"), "input changed (content differs)"),
    (lambda r: (r["dir"] / "in.nii.gz").write_bytes(b"longer image"), "input changed (size differs)"),
    (lambda r: (r["dir"] / "models" / "synthseg_2.0.h5").write_bytes(b"weights v2"), "weights changed"),
    (lambda r: r["args"].extend(["--crop", "64"]), "flags changed (crop)"),
    (lambda r: r["args"].append("--cpu"), "flags changed (cpu, device)"),  # --cpu is --device cpu
    (lambda r: r["args"].extend(["--backend", "torch"]), "flags changed (backend)"),
    (lambda r: r["args"].extend(["--bn", "unfused"]), "flags changed (bn)"),
    (lambda r: r["args"].extend(["--post", str(r["dir"] / "out" / "p.nii.gz")]), "requested outputs differ"),
    (lambda r: r["vol"].unlink(), "output missing"),
    (lambda r: r["seg"].write_bytes(b"segmentatioN"), "output modified since the recorded run"),
    (lambda r: r["sidecar"].write_text("{"), "unreadable"),
])
def test_any_change_reruns_and_drops_the_sidecar(run, capsys, change, reason):
    write(run["args"])
    change(run)
    capsys.readouterr()
    assert check(run["args"]) == P.EXIT_STALE
    assert reason in capsys.readouterr().out
    assert not run["sidecar"].exists()  # an interrupted re-run can never be mistaken for a finished one


def test_force_reruns(run):
    write(run["args"])
    assert check(run["args"], "--force") == P.EXIT_STALE
    assert not run["sidecar"].exists()


def test_missing_weights_mean_run(run, capsys):
    write(run["args"])
    (run["dir"] / "models" / "synthseg_2.0.h5").unlink()
    assert check(run["args"]) == P.EXIT_STALE
    assert "weights not found" in capsys.readouterr().out


def test_upstream_engine_records_the_checkout(run, tmp_path):
    from fake_synthseg import make_checkout

    home = make_checkout(tmp_path / "SynthSeg")
    args = run["args"] + ["--engine", "upstream", "--synthseg-home", str(home)]
    write(args)
    rec = json.loads(run["sidecar"].read_text())
    assert rec["engine"] == "upstream" and rec["upstream"]["home"] == str(home.resolve())
    assert check(args) == P.EXIT_CURRENT
    (home / "SynthSeg" / "predict_synthseg.py").write_text("# edited\n")
    assert check(args) == P.EXIT_STALE


def test_write_refuses_when_an_output_is_missing(run, capsys):
    run["vol"].unlink()
    assert write(run["args"]) == P.EXIT_ERROR
    assert "[ERR] run did not produce" in capsys.readouterr().err
    assert not run["sidecar"].exists()


def test_only_single_image_runs_are_cached(run, capsys):
    args = ["--i", str(run["dir"]), "--o", str(run["dir"] / "out")]
    assert check(args) == P.EXIT_ERROR
    assert "one input image" in capsys.readouterr().err
    assert main(["provenance", "check"]) == P.EXIT_USAGE


def test_toolkit_digest_covers_every_module_of_the_package(tmp_path, monkeypatch):
    """A change in a subpackage (here the engine) must invalidate the cache like a change at the top."""
    import shutil

    copy = tmp_path / "synthseg_native"
    shutil.copytree(P.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(P, "PACKAGE_DIR", copy)
    before = P.toolkit()["sources_sha256"]
    deep = copy / "engine" / "backends" / "tf" / "network.py"
    deep.write_text(deep.read_text() + "\n# changed\n")
    assert P.toolkit()["sources_sha256"] != before
