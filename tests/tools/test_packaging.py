"""``pip install .`` into a fresh Python venv gives working ``synthseg-native`` commands and the API.

The fresh venv borrows the project environment's packages through a ``.pth`` file instead of downloading
TensorFlow again, so the test also proves that the dependencies ``pyproject.toml`` declares are satisfied by the
versions ``make setup`` pins (``pip check``), and that the package is complete without the source tree: it runs
from another folder, from the installed copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"  # a copy: building leaves build/ and *.egg-info behind
    shutil.copytree(ROOT / "synthseg_src", src / "synthseg_src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_dependencies_are_declared_and_met(installed, tmp_path):
    py = installed / "bin" / "python"
    check = run(installed, py, "-m", "pip", "check", cwd=tmp_path)
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr
    code = ("import importlib.metadata as m; print('\\n'.join(m.requires('synthseg-native')))")
    requires = run(installed, py, "-c", code, cwd=tmp_path).stdout
    for pin in ("tensorflow==2.15.1", "keras==2.15.0", "nibabel", "h5py", "scipy", "numpy"):
        assert pin in requires, requires


def test_installed_commands_and_api_work_outside_the_tree(installed, weights, inputs, tmp_path):
    models = weights.need("seg2")
    where = run(installed, installed / "bin" / "python", "-c", "import synthseg_native as s; print(s.__file__)",
                cwd=tmp_path)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    for tool in ("synthseg-native", "synthseg-native-bench", "synthseg-native-compare", "synthseg-native-demo",
                 "synthseg-native-roofline", "synthseg-native-testweights"):
        proc = run(installed, installed / "bin" / tool, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (tool, proc.stdout, proc.stderr)
    doctor = run(installed, installed / "bin" / "synthseg-native-doctor", cwd=tmp_path)
    assert doctor.returncode == 0 and "[INFO] tensorflow 2.15.1" in doctor.stdout, doctor.stdout + doctor.stderr

    seg = run(installed, installed / "bin" / "synthseg-native", "--i", inputs["anatomical"], "--o",
              tmp_path / "seg.nii.gz", "--vol", tmp_path / "vol.csv", "--fast", "--models", models, cwd=tmp_path)
    assert seg.returncode == 0 and "[DONE]" in seg.stdout, seg.stdout + seg.stderr
    code = ("import nibabel as nib, numpy as np\n"
            "from synthseg_native import Segmenter\n"
            f"with Segmenter(fast=True, models={str(models)!r}) as s:\n"
            f"    out = s.segment_image(nib.load({str(inputs['anatomical'])!r}))\n"
            f"cli = nib.load({str(tmp_path / 'seg.nii.gz')!r})\n"
            "assert np.array_equal(np.asarray(out.labels.dataobj), np.asarray(cli.dataobj))\n"
            "print('same labels')\n")
    api = run(installed, installed / "bin" / "python", "-c", code, cwd=tmp_path)
    assert api.returncode == 0 and "same labels" in api.stdout, api.stdout + api.stderr
