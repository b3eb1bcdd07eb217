"""The Python API: segment() and the CLI write the same bytes; Segmenter keeps the networks loaded and
segments nibabel images in memory with the CLI's labels and volumes; errors are typed exceptions."""

from __future__ import annotations

import csv
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthseg_native import InputError, Segmenter, UsageError, WeightsError, segment
from synthseg_native.cli import main

QUICK = ["--fast"]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def volumes_csv(path: Path) -> dict[str, float]:
    with open(path, newline="") as fh:
        header, row = list(csv.reader(fh))[:2]
    return dict(zip(header[1:], map(float, row[1:])))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, weights, inputs):
    """The command line on nibabel's anatomical scan (2 mm, resampled to 1 mm), with every output."""
    models = weights.need("seg2", "qc")
    out = tmp_path_factory.mktemp("cli")
    argv = ["--i", str(inputs["anatomical"]), "--o", str(out / "seg.nii.gz"), "--post", str(out / "post.nii.gz"),
            "--vol", str(out / "vol.csv"), "--qc", str(out / "qc.csv"), "--resample", str(out / "res.nii.gz"),
            "--models", str(models), "--threads", "2", *QUICK]
    assert main(argv) == 0
    return out, models


def test_segment_writes_the_bytes_the_cli_writes(cli_run, inputs, tmp_path):
    cli_out, models = cli_run
    out = tmp_path
    result = segment(inputs["anatomical"], out / "seg.nii.gz", post=str(out / "post.nii.gz"),
                     vol=str(out / "vol.csv"), qc=str(out / "qc.csv"), resample=str(out / "res.nii.gz"),
                     models=str(models), threads=2, fast=True)
    assert result.ok and result.exit_code == 0 and not result.failed
    assert [s.status for s in result.scans] == ["done"]
    assert files_of(out) == files_of(cli_out)
    assert result.scans[0].volumes == pytest.approx(volumes_csv(cli_out / "vol.csv"), abs=0)


def test_segmenter_in_memory_matches_the_cli_files(cli_run, inputs, monkeypatch):
    cli_out, models = cli_run
    from synthseg_native.engine.backends.tf import network

    built = []
    real = network.unet_model
    monkeypatch.setattr(network, "unet_model", lambda *a, **k: built.append(1) or real(*a, **k))
    with Segmenter(fast=True, qc=True, models=str(models), threads=2) as seg:
        first = seg.segment_image(nib.load(str(inputs["anatomical"])), posteriors=True)
        again = seg.segment_image(str(inputs["anatomical"]))
    assert len(built) == 1  # the networks were built once for both images

    labels = nib.load(str(cli_out / "seg.nii.gz"))
    assert np.array_equal(np.asarray(first.labels.dataobj), np.asarray(labels.dataobj))
    assert np.array_equal(first.labels.affine, labels.affine)
    assert first.labels.get_data_dtype() == labels.get_data_dtype()  # int32 in the input header's byte order
    post = nib.load(str(cli_out / "post.nii.gz"))
    assert np.array_equal(np.asarray(first.posteriors.dataobj), np.asarray(post.dataobj))
    assert first.volumes == volumes_csv(cli_out / "vol.csv")
    assert first.qc == volumes_csv(cli_out / "qc.csv")
    assert first.resampled is not None and first.resampled.shape == nib.load(str(cli_out / "res.nii.gz")).shape
    assert first.name == str(inputs["anatomical"]) and set(first.timings) >= {"preprocess", "network", "postprocess"}
    assert np.array_equal(np.asarray(again.labels.dataobj), np.asarray(labels.dataobj)) and again.posteriors is None


def test_segment_of_an_image_object_saves_like_the_cli(cli_run, inputs, tmp_path):
    cli_out, models = cli_run
    img = nib.load(str(inputs["anatomical"]))
    result = segment(img, tmp_path / "seg.nii.gz", post=str(tmp_path / "post.nii.gz"), vol=str(tmp_path / "vol.csv"),
                     qc=str(tmp_path / "qc.csv"), resample=str(tmp_path / "res.nii.gz"), models=str(models),
                     threads=2, fast=True)
    assert result.ok and len(result.images) == 1 and len(result.scans) == 1
    scan = result.scans[0]  # the docs' result.scans[0] works for an image in memory too
    assert scan.status == "done" and scan.volumes == result.images[0].volumes and scan.qc == result.images[0].qc
    assert sorted(scan.outputs) == sorted(str(tmp_path / n) for n in ("seg.nii.gz", "post.nii.gz", "vol.csv",
                                                                      "qc.csv", "res.nii.gz"))
    assert files_of(tmp_path) == files_of(cli_out)
    before = files_of(tmp_path)
    bare = segment(img, models=str(models), fast=True).images[0]  # no output: nothing written
    assert files_of(tmp_path) == before and bare.labels.shape == result.images[0].labels.shape
    assert bare.qc is None and bare.posteriors is None


def test_segmenter_run_reuses_the_networks_for_a_folder(cli_run, inputs, tmp_path):
    _, models = cli_run
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(inputs["anatomical"], scans / "a.nii")
    (scans / "broken.nii.gz").write_bytes(b"not an image")
    with Segmenter(fast=True, models=str(models), threads=2) as seg:
        result = seg.run(scans, tmp_path / "segs", vol=str(tmp_path / "v.csv"))
    assert result.exit_code == 1 and not result.ok
    assert {s.input.rsplit("/", 1)[-1]: s.status for s in result.scans} == {"a.nii": "done", "broken.nii.gz": "failed"}
    assert "broken.nii.gz" in (result.failed[0].error or "")
    with pytest.raises(InputError, match="broken.nii.gz"):
        result.raise_for_failures()
    assert (tmp_path / "segs" / "a_synthseg.nii").is_file()


def test_usage_errors_raise(tmp_path, weights):
    models = str(weights.need("seg2"))
    with pytest.raises(UsageError, match="unknown option"):
        segment(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", parcellation=True)
    with pytest.raises(UsageError, match="input file does not exist"):
        segment(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", models=models)
    with pytest.raises(UsageError, match="--robust cannot be used with --v1"):
        Segmenter(robust=True, v1=True)
    with pytest.raises(UsageError, match="vol cannot be given here"):
        Segmenter(vol="v.csv")
    with pytest.raises(UsageError, match="--crop takes 1 or 3 sizes"):
        segment(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", crop=[1, 2])


@pytest.mark.parametrize("keywords, message", [
    ({"qc": True, "parc": "no"}, "Segmenter(): parc must be True or False, not 'no'"),
    ({"fast": 1}, "Segmenter(): fast must be True or False, not 1"),
    ({"threads": "8"}, "Segmenter(): threads must be an integer, not '8'"),
    ({"threads": 2.5}, "Segmenter(): threads must be an integer, not 2.5"),
    ({"crop": "160"}, "Segmenter(): crop must be an integer or a list of integers, not '160'"),
    ({"crop": [160, None, 160]}, "Segmenter(): crop must be an integer or a list of integers, not [160, None, 160]"),
    ({"max_memory": 8}, "Segmenter(): max_memory must be a size with a unit such as '8G', or 'auto', not 8"),
    ({"device": 0}, "Segmenter(): device must be one of auto, cpu, cuda, mps, not 0"),
    ({"models": 3}, "Segmenter(): models must be a string or a path, not 3"),
])
def test_api_checks_types_like_the_command_line(keywords, message):
    """Refused before anything is loaded: ``parc="no"`` would otherwise be truthy and load the parcellation model."""
    with pytest.raises(UsageError) as err:
        Segmenter(**keywords)
    assert str(err.value) == message


def test_api_takes_paths_for_path_options(tmp_path, inputs):
    with pytest.raises(UsageError, match="segment\\(\\): vol must be a string or a path, not 1"):
        segment(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", vol=1)
    with pytest.raises(WeightsError, match="--models .*/no such dir: no such folder"):
        segment(inputs["anatomical"], tmp_path / "y.nii.gz", models=tmp_path / "no such dir", vol=tmp_path / "v.csv")


def test_missing_weights_raise(tmp_path, monkeypatch):
    for var in ("SYNTHSEG_MODELS", "FREESURFER_HOME", "SYNTHSEG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match="synthseg_2.0.h5 not found"):
        Segmenter(models=str(tmp_path))


def test_bad_image_in_memory_raises(cli_run):
    _, models = cli_run
    with Segmenter(fast=True, models=str(models)) as seg:
        with pytest.raises(InputError, match="image is constant"):
            seg.segment_image(nib.Nifti1Image(np.ones((40, 40, 40), dtype=np.float32), np.eye(4)), name="flat")


def test_import_is_cheap():
    code = ("import sys, synthseg_native, synthseg_native.cli; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported'; "
            "assert callable(synthseg_native.segment) and 'tensorflow' not in sys.modules; "
            "print(synthseg_native.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_api_example_in_the_docs_runs(cli_run, inputs, tmp_path, monkeypatch):
    """docs/api.md's example, run as written (with the test weights, on nibabel's scan as t1.nii.gz)."""
    _, models = cli_run
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    blocks = text.split("```python\n")[1:]
    assert blocks, "docs/api.md has no python example"
    example = blocks[0].split("```")[0]
    shutil.copy(inputs["anatomical"], tmp_path / "t1.nii")
    nib.save(nib.load(str(tmp_path / "t1.nii")), str(tmp_path / "t1.nii.gz"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYNTHSEG_MODELS", str(models))
    namespace: dict = {}
    exec(compile(example, "docs/api.md", "exec"), namespace)
    assert (tmp_path / "t1_synthseg.nii.gz").is_file() and (tmp_path / "volumes.csv").is_file()


def test_keepgeom_and_addctab_in_memory_and_saved_like_the_cli(cli_run, inputs, tmp_path, monkeypatch):
    """``Segmenter(keepgeom=True, addctab=True)``: the labels come back on the input's grid with the table in
    FreeSurfer's header extension, and ``save`` writes the command line's bytes, .mgz included."""
    from synthseg_native.api import save
    from synthseg_native.io.freesurfer import read_embedded_lut

    _, models = cli_run
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    cli = tmp_path / "cli"
    for name in ("seg.nii.gz", "seg.mgz"):
        assert main(["--i", str(inputs["anatomical"]), "--o", str(cli / name), "--models", str(models), "--threads",
                     "2", "--keepgeom", "--addctab", *QUICK]) == 0
    with Segmenter(fast=True, keepgeom=True, addctab=True, models=str(models), threads=2) as seg:
        image = seg.segment_image(str(inputs["anatomical"]))
        source = nib.load(str(inputs["anatomical"]))
        assert image.labels.shape == source.shape and np.allclose(image.labels.affine, source.affine, atol=1e-4)
        assert np.array_equal(np.asarray(image.labels.dataobj), np.asarray(nib.load(str(cli / "seg.nii.gz")).dataobj))
        ext = [e for e in image.labels.header.extensions if e.get_code() == 14]
        assert len(ext) == 1
        api = tmp_path / "api"
        api.mkdir()
        for name in ("seg.nii.gz", "seg.mgz"):
            save(image, api / name, addctab=True)
    for name in ("seg.nii.gz", "seg.mgz"):
        assert gzip.decompress((api / name).read_bytes()) == gzip.decompress((cli / name).read_bytes()), name
        assert read_embedded_lut(api / name) == read_embedded_lut(cli / name)
    assert (api / "seg_ctab.txt").read_text() == (cli / "seg_ctab.txt").read_text()
