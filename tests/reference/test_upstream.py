"""The upstream engine must reject a bad checkout clearly and hand upstream's ``predict()`` the
arguments its own script would, except for the weights folder. A fake checkout records what it
receives; it runs in a fresh interpreter because the engine edits sys.path and sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_synthseg import LABEL_FILES, make_checkout
from synthseg_native.config import Options
from synthseg_native.errors import UpstreamError
from synthseg_native.reference.upstream import find_synthseg_home, predict_kwargs

SRC = Path(__file__).resolve().parents[2] / "synthseg_src"
REFERENCE_LABELS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "labels"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return make_checkout(tmp_path / "SynthSeg-master")


def _run(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> tuple[int, str, dict]:
    record = tmp_path / "record.json"
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SYNTHSEG_HOME"}
    env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
                "FAKE_RECORD": str(record), "TF_CPP_MIN_LOG_LEVEL": "3"}, **(env_extra or {}))
    (tmp_path / "in.nii.gz").touch()  # the plan checks that the input exists; the fake upstream never reads it
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    for name in ("synthseg_2.0.h5", "synthseg_1.0.h5", "synthseg_robust_2.0.h5"):
        (weights / name).touch()
    proc = subprocess.run([sys.executable, "-m", "synthseg_native", "--engine", "upstream", *args], env=env,
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    kwargs = json.loads(record.read_text()) if record.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, kwargs


def _base_args(home: Path, tmp_path: Path) -> list[str]:
    return ["--synthseg-home", str(home), "--models", str(tmp_path / "weights"),
            "--i", "in.nii.gz", "--o", "out.nii.gz"]


def test_unset_home_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SYNTHSEG_HOME", raising=False)
    with pytest.raises(UpstreamError, match="SYNTHSEG_HOME is not set"):
        find_synthseg_home(None)


def test_missing_home_is_a_clear_error(tmp_path):
    with pytest.raises(UpstreamError, match=r"nowhere is not a SynthSeg checkout \(missing"):
        find_synthseg_home(str(tmp_path / "nowhere"))


def test_folder_without_synthseg_names_what_is_missing(tmp_path):
    with pytest.raises(UpstreamError) as err:
        find_synthseg_home(str(tmp_path))
    assert "is not a SynthSeg checkout" in str(err.value)
    assert "SynthSeg/predict_synthseg.py" in str(err.value)
    assert "data/labels_classes_priors/" in str(err.value)


def test_env_variable_is_the_default(monkeypatch, checkout):
    monkeypatch.setenv("SYNTHSEG_HOME", str(checkout))
    assert find_synthseg_home(None) == checkout.resolve()


def test_cli_reports_unset_home_with_err_prefix(tmp_path):
    rc, out, kwargs = _run(tmp_path, "--models", str(tmp_path / "weights"), "--i", "in.nii.gz", "--o", "b.nii")
    assert rc == 1 and not kwargs
    assert "[ERR] SYNTHSEG_HOME is not set" in out
    assert "Traceback" not in out


def test_label_files_are_upstream_names(checkout):
    """Every table the engine passes exists in a checkout laid out like upstream's."""
    for v1 in (False, True):
        tables = [v for v in predict_kwargs(Options(i="a", o="b", v1=v1), checkout, "m").values()
                  if str(v).endswith(".npy")]
        assert len(tables) == 8 and all(Path(t).is_file() for t in tables)
    if REFERENCE_LABELS.is_dir():
        assert sorted(LABEL_FILES) == sorted(p.name for p in REFERENCE_LABELS.glob("*.npy"))


def test_default_run_wiring(tmp_path, checkout):
    rc, out, kw = _run(tmp_path, *_base_args(checkout, tmp_path), "--vol", "v.csv", "--threads", "3")
    assert rc == 0, out
    weights, labels = str(tmp_path / "weights"), str(checkout.resolve() / "data" / "labels_classes_priors")
    assert kw["_module"] == str(checkout.resolve() / "SynthSeg" / "predict_synthseg.py")
    assert kw["path_model_segmentation"] == os.path.join(weights, "synthseg_2.0.h5")
    assert kw["path_model_parcellation"] == os.path.join(weights, "synthseg_parc_2.0.h5")
    assert kw["path_model_qc"] == os.path.join(weights, "synthseg_qc_2.0.h5")
    assert kw["labels_segmentation"] == os.path.join(labels, "synthseg_segmentation_labels_2.0.npy")
    assert kw["n_neutral_labels"] == 19 and kw["fast"] is False and kw["robust"] is False
    paths = (kw["path_images"], kw["path_segmentations"], kw["path_volumes"])
    assert paths == ("in.nii.gz", "out.nii.gz", "v.csv")
    assert kw["cropping"] is None and kw["path_qc_scores"] is None
    assert kw["_threads"] == [3, 3] and kw["_bn_patch"] is False and kw["_cuda"] is None
    assert "[INFO] upstream engine: SynthSeg 2.0" in out


def test_v1_switches_tables_and_neutral_labels(tmp_path, checkout):
    rc, out, kw = _run(tmp_path, *_base_args(checkout, tmp_path), "--v1", "--crop", "160", "--cpu")
    assert rc == 0, out
    assert kw["path_model_segmentation"].endswith(os.sep + "synthseg_1.0.h5")
    for key in ("labels_segmentation", "names_segmentation", "labels_qc", "names_qc", "topology_classes"):
        assert kw[key].endswith(".npy") and not kw[key].endswith("_2.0.npy"), key
    assert kw["labels_denoiser"].endswith("synthseg_denoiser_labels_2.0.npy")
    assert kw["n_neutral_labels"] == 18 and kw["v1"] is True
    assert kw["cropping"] == [160, 160, 160] and kw["_cuda"] == "-1"  # one --crop size means three, as upstream


def test_robust_forces_fast_and_unfused_bn_is_applied(tmp_path, checkout):
    rc, out, kw = _run(tmp_path, *_base_args(checkout, tmp_path), "--robust", "--parc", "--bn", "unfused")
    assert rc == 0, out
    assert kw["path_model_segmentation"] == os.path.join(str(tmp_path / "weights"), "synthseg_robust_2.0.h5")
    assert kw["robust"] is True and kw["fast"] is True and kw["do_parcellation"] is True
    assert kw["labels_segmentation"].endswith("synthseg_segmentation_labels_2.0.npy")
    assert kw["_bn_patch"] is True
    assert "[INFO] BatchNorm patch applied" in out and "SynthSeg-robust 2.0" in out


def test_robust_with_v1_is_refused(tmp_path, checkout):
    rc, out, kw = _run(tmp_path, *_base_args(checkout, tmp_path), "--robust", "--v1")
    assert rc == 2 and not kw
    assert "[ERR] --robust cannot be used with --v1" in out


def test_upstream_exit_status_is_returned(tmp_path, checkout):
    rc, out, kw = _run(tmp_path, *_base_args(checkout, tmp_path), env_extra={"FAKE_EXIT": "1"})
    assert rc == 1 and kw, out


def test_upstream_crash_is_reported(tmp_path, checkout):
    crashing = "def predict(**kw):\n    assert False, 'no model'\n"
    (checkout / "SynthSeg" / "predict_synthseg.py").write_text(crashing)
    rc, out, _ = _run(tmp_path, *_base_args(checkout, tmp_path))
    assert rc == 1
    assert "[ERR] upstream SynthSeg failed: AssertionError: no model" in out
