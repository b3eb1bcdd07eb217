"""Test weights for every model, from the recipes in the package: the same files everywhere, without TensorFlow.

The recipes were written by ``devtools/weightauthor.py`` (TensorFlow's calibration on the MNI152); here they are
rebuilt with numpy and h5py, in an environment where TensorFlow, Keras, nilearn and PyTorch cannot be imported, and
(slow) compared with what the author's calibration gives on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthseg_native.engine.weights import MODEL_FILES, SYNTHSEG_KEYS, is_test_weights, read_weights
from synthseg_native.errors import WeightsError
from synthseg_native.tools import testweights

BLOCK = Path(__file__).resolve().parents[1] / "no_tensorflow"  # a sitecustomize hiding packages


def test_packaged_recipes_cover_every_model_and_stay_small():
    sizes = {key: testweights.recipe(key).stat().st_size for key in SYNTHSEG_KEYS}
    assert sum(sizes.values()) < 1_000_000, sizes


def test_all_five_by_default_without_any_framework(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCK), *sys.path]),
           "TEST_ABSENT": "tensorflow,keras,nilearn,torch"}
    proc = subprocess.run([sys.executable, "-m", "synthseg_native.tools.testweights", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(MODEL_FILES[k] for k in SYNTHSEG_KEYS)
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [f"[DONE] {k}" for k in SYNTHSEG_KEYS]
    assert all(is_test_weights(tmp_path / MODEL_FILES[k]) for k in SYNTHSEG_KEYS)
    assert len(read_weights(tmp_path / MODEL_FILES["qc"])) > 10


def test_only_and_unknown_models(tmp_path, capsys):
    assert testweights.main([str(tmp_path), "--only", "parc", "qc"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthseg_parc_2.0.h5", "synthseg_qc_2.0.h5"]
    with pytest.raises(WeightsError, match="unknown model"):
        testweights.generate(tmp_path, only=["seg3"])


@pytest.mark.slow
def test_recipes_are_the_calibration_of_this_machine(tmp_path):
    """The author's TensorFlow calibration, redone here, gives the packaged weights: bit for bit on the CPU they were
    written on (AMD EPYC Zen 4, 2026-12-07), within float32 rounding of the calibration's convolutions elsewhere."""
    from devtools import weightauthor

    weightauthor.generate(tmp_path / "author", seed=testweights.SEED, layout="model", only=["seg2"])
    testweights.generate(tmp_path / "package", only=["seg2"])
    author = read_weights(tmp_path / "author" / MODEL_FILES["seg2"])
    package = read_weights(tmp_path / "package" / MODEL_FILES["seg2"])
    assert list(author) == list(package)
    for layer, kinds in package.items():
        for kind, value in kinds.items():
            np.testing.assert_allclose(author[layer][kind], value, rtol=1e-3, atol=1e-5, err_msg=f"{layer}/{kind}")
