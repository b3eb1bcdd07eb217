"""Which backend runs: ``--backend auto`` (the default) takes what is installed, tf where TensorFlow is, else torch;
an explicit choice that cannot be honoured, and an environment with neither framework, are one [ERR] line naming
the extra to install, never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthseg_native.config import Options
from synthseg_native.engine import predictor
from synthseg_native.errors import UsageError

BLOCK = Path(__file__).resolve().parents[1] / "no_tensorflow"  # a sitecustomize hiding packages


@pytest.fixture
def frameworks(monkeypatch):
    """Pretend only the given frameworks are installed."""
    present: set[str] = set()
    monkeypatch.setattr(predictor, "installed", lambda name: name in present)
    return present


@pytest.mark.parametrize("have, options, backend, reason", [
    ({"tensorflow", "torch"}, {}, "tf", "--backend auto: TensorFlow is installed"),
    ({"tensorflow"}, {}, "tf", "--backend auto: TensorFlow is installed"),
    ({"torch"}, {}, "torch", "--backend auto: PyTorch is installed, TensorFlow is not"),
    ({"tensorflow", "torch"}, {"device": "mps"}, "torch", "--backend auto: --device mps and --precision fp32 need "
                                                          "PyTorch"),
    ({"tensorflow", "torch"}, {"precision": "tf32"}, "torch", "--backend auto: --device auto and --precision tf32 "
                                                              "need PyTorch"),
    ({"tensorflow", "torch"}, {"backend": "torch"}, "torch", ""),
    ({"tensorflow", "torch"}, {"backend": "tf"}, "tf", ""),
])
def test_auto_takes_what_is_installed(frameworks, have, options, backend, reason):
    frameworks.update(have)
    opts = Options(**options)
    assert predictor.resolve_backend(opts) == backend
    assert predictor.backend_reason(opts, backend) == reason


@pytest.mark.parametrize("have, options, message", [
    (set(), {}, "no network backend is installed: pip install 'synthseg-native[tf]'"),
    ({"torch"}, {"backend": "tf"}, "the tf backend needs TensorFlow, which this environment lacks: pip install "
                                   "'synthseg-native[tf]'"),
    ({"tensorflow"}, {"backend": "torch"}, "the torch backend needs PyTorch, which this environment lacks: pip "
                                           "install 'synthseg-native[torch]'"),
    ({"tensorflow"}, {"device": "mps"}, "--device mps / --precision fp32 (torch backend) needs PyTorch"),
])
def test_what_cannot_run_is_refused_with_the_extra_to_install(frameworks, have, options, message):
    frameworks.update(have)
    with pytest.raises(UsageError) as err:
        predictor.resolve_backend(Options(**options))
    assert str(err.value).startswith(message)


def test_a_bare_install_says_which_extra_to_add(tmp_path):
    """The command line in an environment without TensorFlow and PyTorch (both hidden): one [ERR], exit 2."""
    image = tmp_path / "t1.nii.gz"
    image.write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCK), *sys.path]),
           "TEST_ABSENT": "tensorflow,keras,torch"}
    proc = subprocess.run([sys.executable, "-m", "synthseg_native", "--i", str(tmp_path), "--o", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "[ERR] no network backend is installed: pip install 'synthseg-native[tf]' (TensorFlow 2.15, Python 3.9-3.11: "
        "upstream's bytes on the CPU), or pip install 'synthseg-native[torch]' (PyTorch: CUDA and Apple GPUs, or the "
        "CPU)"]
