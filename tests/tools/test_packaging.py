"""``pip install .`` into a fresh Python venv gives working ``synthseg-native`` commands and the API, and each
extra brings its own framework and not the other's.

The fresh venv borrows the project environment's packages through a ``.pth`` file instead of downloading
TensorFlow again, so the test also proves that the dependencies ``pyproject.toml`` declares are satisfied by the
versions ``make setup`` pins (``pip check``), and that the package is complete without the source tree: it runs
from another folder, from the installed copy. What the extras pull in is resolved by pip for real (a dry run in a
fresh venv: the package registry's metadata, nothing installed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def source_copy(where: Path) -> Path:
    """The package's sources as a fresh clone has them (building must leave nothing behind in the real tree)."""
    src = where / "src"
    shutil.copytree(ROOT / "synthseg_src", src / "synthseg_src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    src = source_copy(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The venv's bundled setuptools (65 on Python 3.11) would shadow the project's, which torch needs >= 77 of.
    subprocess.run([str(py), "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"], check=True, timeout=300)
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in src.iterdir()) == ["README.md", "pyproject.toml", "synthseg_src"]  # no build/
    assert sorted(p.name for p in (src / "synthseg_src").iterdir()) == ["synthseg_native"]  # no *.egg-info
    return venv


def run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_dependencies_are_declared_and_met(installed, tmp_path):
    py = installed / "bin" / "python"
    check = run(installed, py, "-m", "pip", "check", cwd=tmp_path)
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr
    code = ("import importlib.metadata as m; print('\\n'.join(m.requires('synthseg-native')))")
    requires = run(installed, py, "-c", code, cwd=tmp_path).stdout.splitlines()
    base = [re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requires if "extra ==" not in r]
    assert {"numpy", "h5py", "nibabel", "scipy"} <= set(base) and not {"tensorflow", "keras", "torch"} & set(base)
    for pin in ("tensorflow==2.15.1; extra == 'tf'", "keras==2.15.0; extra == 'tf'", "numpy<2; extra == 'tf'",
                "torch<3,>=2.9; extra == 'torch'"):
        assert pin in requires, requires


def test_installed_commands_and_api_work_outside_the_tree(installed, weights, inputs, tmp_path):
    models = weights.need("seg2")
    where = run(installed, installed / "bin" / "python", "-c", "import synthseg_native as s; print(s.__file__)",
                cwd=tmp_path)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    for tool in ("synthseg-native", "mri_synthseg", "synthseg-native-compare", "synthseg-native-demo",
                 "synthseg-native-testweights"):
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


def python312() -> str | None:
    """A working Python 3.12 interpreter, if this machine has one (pyenv's shims exist without the version)."""
    pyenv = sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    candidates = [shutil.which("python3.12"), *pyenv]
    for candidate in filter(None, candidates):
        proc = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 12))"],
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip() == "True":
            return candidate
    return None


def test_torch_extra_on_python312_without_tensorflow(weights, inputs, tmp_path):
    """``pip install .[torch]`` on a fresh Python 3.12 venv, dependencies resolved for real: numpy 2, PyTorch, no
    TensorFlow; the torch backend segments, the tf backend is refused with one clear line."""
    py312 = python312()
    if py312 is None:
        pytest.skip("no Python 3.12 interpreter on this machine")
    models = weights.need("seg2")
    src = source_copy(tmp_path)
    venv = tmp_path / "venv312"
    subprocess.run([py312, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           f"{src}[torch]"], capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = run(venv, py, "-m", "pip", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    facts = run(venv, py, "-c", "import importlib.util as u, numpy, torch; "
                "print(numpy.__version__, u.find_spec('tensorflow') is None)", cwd=tmp_path)
    numpy_version, no_tf = facts.stdout.split()
    assert int(numpy_version.split(".")[0]) >= 2 and no_tf == "True", facts.stdout + facts.stderr
    seg = run(venv, venv / "bin" / "synthseg-native", "--i", inputs["anatomical"], "--o", tmp_path / "seg.nii.gz",
              "--vol", tmp_path / "vol.csv", "--fast", "--device", "cpu", "--models", models, cwd=tmp_path)
    assert seg.returncode == 0 and "[DONE]" in seg.stdout, seg.stdout + seg.stderr
    assert "(torch backend, --backend auto: PyTorch is installed, TensorFlow is not)" in seg.stdout, seg.stdout
    refused = run(venv, venv / "bin" / "synthseg-native", "--i", inputs["anatomical"], "--o", tmp_path / "x.nii.gz",
                  "--backend", "tf", "--models", models, cwd=tmp_path)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "[ERR] the tf backend needs TensorFlow, which this environment lacks: pip install 'synthseg-native[tf]' "
        "(TensorFlow 2.15, Python 3.9-3.11: upstream's bytes on the CPU); or use --backend torch (or auto)"], \
        refused.stdout + refused.stderr
    weights = run(venv, venv / "bin" / "synthseg-native-testweights", tmp_path / "w", "--only", "qc", cwd=tmp_path)
    assert weights.returncode == 0 and (tmp_path / "w" / "synthseg_qc_2.0.h5").is_file(), weights.stderr


@pytest.mark.parametrize("extra, present, absent, numpy_major", [
    ("tf", "tensorflow", "torch", 1),
    ("torch", "torch", "tensorflow", 2),
    (None, "nibabel", "tensorflow", 2),
])
def test_extras_resolve_without_the_other_framework(tmp_path, extra, present, absent, numpy_major):
    """pip resolves ``.[tf]`` without PyTorch, ``.[torch]`` without TensorFlow (and with numpy 2), the bare package
    with neither, in a fresh venv of this Python (a dry run: metadata from the registry, nothing installed)."""
    src = source_copy(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    report = tmp_path / "report.json"
    target = f"{src}[{extra}]" if extra else str(src)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), target],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    versions = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert present in versions and absent not in versions, versions
    assert ("keras" in versions) == (extra == "tf"), versions
    assert int(versions["numpy"].split(".")[0]) == numpy_major, versions
