"""``--conventions freesurfer`` (the ``mri_synthseg`` command) where FreeSurfer 8 and upstream SynthSeg differ, and
the environment FreeSurfer's callers set (qsiprep: TF_ENABLE_ONEDNN_OPTS=0, TF_USE_LEGACY_KERAS=1)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.config import Options
from synthseg_native.engine.backends.tf import devices
from synthseg_native.engine.preprocess import preprocess
from synthseg_native.engine.spec import ModelSpec
from synthseg_native.errors import InputError
from synthseg_native.io.images import from_nibabel


def two_channels() -> nib.Nifti1Image:
    rng = np.random.default_rng(1)
    data = np.zeros((48, 56, 40, 2), np.float32)
    data[8:40, 8:48, 8:32] = rng.uniform(10, 100, (32, 40, 24, 2))
    return nib.Nifti1Image(data, np.eye(4))


def test_a_multichannel_image_is_averaged_under_freesurfer_conventions():
    img = two_channels()
    data = np.asarray(img.dataobj, dtype=np.float64)
    mean = preprocess(from_nibabel(nib.Nifti1Image(data.mean(-1), np.eye(4)), "m"), "m")
    first = preprocess(from_nibabel(nib.Nifti1Image(data[..., 0], np.eye(4)), "f"), "f")
    fs = preprocess(from_nibabel(img, "x"), "x", conventions="freesurfer")
    up = preprocess(from_nibabel(img, "x"), "x")
    assert np.array_equal(fs.image, mean.image) and np.array_equal(up.image, first.image)
    assert not np.array_equal(fs.image, up.image)


def test_a_thin_last_axis_is_refused_under_freesurfer_conventions():
    """A last axis of 4-10 voxels counts as channels: upstream segments such a volume as 3-D, FreeSurfer refuses."""
    img = nib.Nifti1Image(np.random.default_rng(0).uniform(0, 1, (64, 64, 6)).astype(np.float32), np.diag([4, 4, 4, 1]))
    preprocess(from_nibabel(img, "thin.nii"), "thin.nii")
    with pytest.raises(InputError, match="thin.nii: input should have 3 dimensions, has 2"):
        preprocess(from_nibabel(img, "thin.nii"), "thin.nii", conventions="freesurfer")


def test_freesurfer_builds_batchnorm_unfused_unless_asked_otherwise():
    assert ModelSpec.of(Options(conventions="freesurfer")).bn == "unfused"
    assert ModelSpec.of(Options(conventions="freesurfer", bn="fused")).bn == "fused"
    assert ModelSpec.of(Options()).bn == "auto"


@pytest.mark.parametrize("vendor, honoured", [("GenuineIntel", True), ("AuthenticAMD", False)])
def test_onednn_off_is_honoured_only_where_eigen_conv3d_does_not_crash(vendor, honoured, monkeypatch, capsys):
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(devices, "cpu_vendor", lambda: vendor)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    devices.prepare_tensorflow()
    assert devices.os.environ["TF_ENABLE_ONEDNN_OPTS"] == ("0" if honoured else "1")
    err = capsys.readouterr().err
    assert err.count("[WARN] TF_ENABLE_ONEDNN_OPTS=0 is not honoured") == (0 if honoured else 1)


def test_legacy_keras_request_is_dropped(monkeypatch, capsys):
    """TensorFlow 2.15 would look for the tf_keras package; its own tf.keras is Keras 2 already."""
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    devices.prepare_tensorflow()
    assert "TF_USE_LEGACY_KERAS" not in devices.os.environ
    assert "[INFO] TF_USE_LEGACY_KERAS ignored" in capsys.readouterr().out
