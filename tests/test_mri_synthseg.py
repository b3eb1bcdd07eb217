"""``mri_synthseg``: FreeSurfer 8's command line, its exit codes, its callers' exact calls (recon-all, qsiprep).

The byte-for-byte comparison with FreeSurfer's own script needs that script, surfa and TensorFlow in an environment
of their own (docs/equivalence.md records it); these tests run what CI can: the command, its conventions, and the
pieces against values recorded from FreeSurfer (tests/io/test_freesurfer_io.py, tests/engine/test_autocrop.py).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine_fixtures import photo_test_models
from synthseg_native.engine import machine
from synthseg_native.engine.weights import MODEL_FILES
from synthseg_native.io.freesurfer import read_embedded_lut
from synthseg_native.mri_synthseg import main, vmpeak_kb

ROOT = Path(__file__).resolve().parents[1]
# The header rows FreeSurfer 8's script (commit 0edd010) wrote in the recon-all and qsiprep calls (2026-12-07,
# docs/equivalence.md); csv.writer's \r\n line ends included.
SIDES = ["cerebral white matter", "cerebral cortex", "lateral ventricle", "inferior lateral ventricle",
         "cerebellum white matter", "cerebellum cortex", "thalamus", "caudate", "putamen", "pallidum"]
FS_VOLUME_HEADER = ("subject,total intracranial," + ",".join(f"left {n}" for n in SIDES)
                    + ",3rd ventricle,4th ventricle,brain-stem,left hippocampus,left amygdala,csf,left accumbens area,"
                    "left ventral DC," + ",".join(f"right {n}" for n in SIDES) + ",right hippocampus,right amygdala,"
                    "right accumbens area,right ventral DC\r\n")
FS_QC_HEADER = ("subject,general white matter,general grey matter,general csf,cerebellum,brainstem,thalamus,"
                "putamen+pallidum,hippocampus+amygdala\r\n")
LUT = """#$Id: a small FreeSurferColorLUT.txt for the tests $

#No. Label Name:                            R   G   B   A
0   Unknown                                 0   0   0   0
2   Left-Cerebral-White-Matter              245 245 245 0
3   Left-Cerebral-Cortex                    205 62  78  0
17  Left-Hippocampus                        220 216 20  0
9999 Not-A-SynthSeg-Label                   1   2   3   4
"""


@pytest.fixture
def fs_home(weights, tmp_path, monkeypatch) -> Path:
    """A FreeSurfer-like home: models/ with the test weights (and Photo-SynthSeg's, made from them), and a LUT."""
    home = tmp_path / "freesurfer"
    models = home / "models"
    models.mkdir(parents=True)
    src = weights.need("seg2", "parc", "qc", "robust")
    for key in ("seg2", "parc", "qc", "robust"):
        (models / MODEL_FILES[key]).symlink_to(src / MODEL_FILES[key])
    (home / "FreeSurferColorLUT.txt").write_text(LUT)
    monkeypatch.setenv("FREESURFER_HOME", str(home))
    monkeypatch.delenv("SYNTHSEG_MODELS", raising=False)
    return home


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SYNTHSEG_MODELS", "TF_ENABLE_ONEDNN_OPTS")}
    env.update(FREESURFER_HOME=str(home), PYTHONPATH=str(ROOT / "synthseg_src"), **extra)
    return env


def test_no_arguments_print_the_help_and_exit_1(capsys):
    assert main([]) == 1
    assert "usage: mri_synthseg" in capsys.readouterr().out


def test_a_flag_argparse_refuses_exits_2(capsys):
    assert main(["--i", "a.nii", "--threads", "x"]) == 2
    assert "[ERR]" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--autocrop", "--crop", "160"], "--autocrop cannot be used with --crop"),
    (["--photo", "both", "--qc", "q.csv"], "--photo cannot be used with --qc"),
    (["--photo", "both", "--robust"], "--photo cannot be used with --robust"),
    (["--photo", "top"], "--photo must be left, right or both"),
    (["--robust", "--v1"], "--robust cannot be used with --v1"),
])
def test_requests_freesurfer_refuses_exit_1_with_one_error_line(flags, message, tmp_path, capsys):
    """FreeSurfer's ``Error: ...`` cases exit 1 (argparse's own errors exit 2)."""
    image = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((40, 40, 40), np.float32), np.eye(4)), image)
    assert main(["--i", str(image), "--o", str(tmp_path / "s.nii.gz"), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[ERR]") and message in err[0]
    assert not (tmp_path / "s.nii.gz").exists()


def test_the_missing_model_file_is_exit_1(inputs, fs_home, tmp_path, capsys):
    assert main(["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz"), "--model", "nowhere.h5"]) == 1
    assert "the provided model path does not exist" in capsys.readouterr().err


def test_recon_all_call_unchanged(inputs, fs_home, tmp_path):
    """FreeSurfer 8.2's recon-all: ``mri_synthseg --i orig.mgz --o synthseg.rca.mgz --threads N --vol
    stats/synthseg.vol.csv --keepgeom --addctab --cpu``, then it reads the CSV's ``total intracranial``."""
    subject = tmp_path / "subj" / "mri"
    (tmp_path / "subj" / "stats").mkdir(parents=True)
    subject.mkdir(parents=True)
    src = nib.load(str(inputs["lia"]))  # a conformed-like LIA .mgz
    orig = subject / "orig.mgz"
    data = np.asarray(src.dataobj)
    nib.save(nib.MGHImage(np.clip(data / data.max() * 255, 0, 255).astype(np.uint8), src.affine), orig)
    cmd = [sys.executable, "-m", "synthseg_native.mri_synthseg", "--i", str(orig), "--o",
           str(subject / "synthseg.rca.mgz"), "--threads", "2", "--vol", str(tmp_path / "subj/stats/synthseg.vol.csv"),
           "--keepgeom", "--addctab", "--cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(fs_home), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "#@# mri_synthseg vmpeak  " in proc.stdout
    seg = nib.load(str(subject / "synthseg.rca.mgz"))
    assert seg.shape == nib.load(str(orig)).shape and np.allclose(seg.affine, nib.load(str(orig)).affine, atol=1e-4)
    table = read_embedded_lut(subject / "synthseg.rca.mgz")
    assert list(table) == [0, 2, 3, 17, 9999]  # the whole $FREESURFER_HOME table, not only the labels present
    assert table[17].name == "Left-Hippocampus" and table[17].rgb == (220, 216, 20)
    with open(tmp_path / "subj/stats/synthseg.vol.csv", newline="") as fh:
        assert fh.readline() == FS_VOLUME_HEADER
        row = next(csv.reader(fh))
    assert row[0] == "orig.mgz" and float(row[1]) > 0  # the subject keeps .mgz, as FreeSurfer's does


def test_qsiprep_call_unchanged(inputs, fs_home, tmp_path):
    """qsiprep: ``mri_synthseg --i … --o … --post … --qc … --cpu --threads 1 --robust`` with TF_USE_LEGACY_KERAS=1
    and TF_ENABLE_ONEDNN_OPTS=0 in the environment. On CPUs where TensorFlow's Eigen Conv3D crashes (not Intel)
    oneDNN is kept, with one [WARN] saying so."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "synthseg_native.mri_synthseg", "--i", str(inputs["ras"]), "--o",
           str(out / "seg.nii.gz"), "--post", str(out / "post.nii.gz"), "--qc", str(out / "qc.csv"), "--cpu",
           "--threads", "1", "--robust"]
    env = subprocess_env(fs_home, TF_USE_LEGACY_KERAS="1", TF_ENABLE_ONEDNN_OPTS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = "TF_ENABLE_ONEDNN_OPTS=0 is not honoured" in proc.stderr
    assert warned == (machine.cpu_vendor() != "GenuineIntel")
    assert nib.load(str(out / "post.nii.gz")).shape[-1] == 33
    with open(out / "qc.csv", newline="") as fh:
        assert fh.readline() == FS_QC_HEADER
        rows = list(csv.reader(fh))
    assert len(rows) == 1 and all(0 <= float(v) <= 1 for v in rows[0][1:])


def test_weights_come_from_freesurfer_home_first(inputs, fs_home, tmp_path, monkeypatch, capsys):
    """As FreeSurfer's: $FREESURFER_HOME/models before $SYNTHSEG_MODELS (whose folder here has no weights)."""
    monkeypatch.setenv("SYNTHSEG_MODELS", str(tmp_path / "elsewhere"))
    assert main(["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz"), "--crop", "64", "--fast"]) == 0
    assert f"weights {fs_home / 'models'} ($FREESURFER_HOME/models)" in capsys.readouterr().out


def test_photo_synthseg_both_and_single_hemispheres(inputs, weights, fs_home, tmp_path):
    photo_test_models(fs_home / "models", weights.need("seg2") / MODEL_FILES["seg2"])
    segs = {}
    for side in ("both", "left", "right"):
        d = tmp_path / side
        assert main(["--i", str(inputs["ras"]), "--o", str(d / "s.nii.gz"), "--vol", str(d / "v.csv"),
                     "--photo", side, "--crop", "64", "--threads", "2"]) == 0
        segs[side] = np.asanyarray(nib.load(str(d / "s.nii.gz")).dataobj)
        with open(d / "v.csv", newline="") as fh:
            header = next(csv.reader(fh))
        assert "total intracranial" not in header  # Photo-SynthSeg has no intracranial volume
        assert header[1] == "left cerebral white matter" and "csf" in header  # label order, from the lists
        assert len(header) == 1 + (32 if side == "both" else 18)
    single = set(np.load(fs_home / "models" / "synthseg_segmentation_labels_photo_single_1.0.npy").tolist())
    assert set(np.unique(segs["left"]).tolist()) <= single and set(np.unique(segs["right"]).tolist()) <= single
    assert not np.array_equal(segs["left"], segs["right"])  # the right hemisphere is seen mirrored
    assert len(np.unique(segs["both"])) > len(single) // 2


def test_photo_lists_missing_is_one_error(inputs, fs_home, tmp_path, capsys):
    (fs_home / "models" / "synthseg_photo_both_1.0.h5").symlink_to(fs_home / "models" / "synthseg_2.0.h5")
    assert main(["--i", str(inputs["ras"]), "--o", str(tmp_path / "s.nii.gz"), "--photo", "both"]) == 1
    assert "synthseg_segmentation_labels_photo_both_1.0.npy: Photo-SynthSeg's label list is missing" in \
        capsys.readouterr().err


def test_vmpeak_is_read_as_freesurfer_reads_it():
    peak = vmpeak_kb()
    if sys.platform.startswith("linux"):
        assert isinstance(peak, int) and peak > 1000
    else:
        assert peak is None
