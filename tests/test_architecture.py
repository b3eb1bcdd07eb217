"""The layers of docs/architecture.md hold: import-linter's contracts (``make lint``) catch an import that points
up, and imports inside functions are kept for the heavy optional modules only."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "synthseg_src" / "synthseg_native"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# Imported where they are used, so that `import synthseg_native`, --help and the tools stay fast, and
# TensorFlow is imported only after its environment is set (backends/tf/devices.prepare_tensorflow). The API (the
# engine's whole code, 0.6 s) is imported by the command line and the pipeline stage once they know there is
# something to run: a cached pipeline step ([SKIP]) does without it.
HEAVY = ("tensorflow", "keras", "torch", "matplotlib", "nilearn", "tqdm", "synthseg_native.engine.backends",
         "synthseg_native.api")


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level)[0] if node.level else ""
                module = ".".join(filter(None, [base, node.module or ""]))
                found.append((node.lineno, module))
    return found


def test_imports_inside_functions_are_only_the_heavy_optional_ones():
    bad = [f"{path.relative_to(ROOT)}:{line}: {module}"
           for path in sorted(PACKAGE.rglob("*.py")) for line, module in function_level_imports(path)
           if not module.startswith(HEAVY)]
    assert not bad, "imports inside functions (move them to the top, or into the layer below):\n" + "\n".join(bad)


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
                          cwd=tree, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tree / "synthseg_src"), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "synthseg_src" / "synthseg_native",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.skipif(not LINT_IMPORTS.is_file(), reason="import-linter is not installed (make setup)")
def test_the_layers_contracts_hold_and_catch_an_upward_import(tree_copy: Path):
    ok = _lint(tree_copy)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "BROKEN" not in ok.stdout and ok.stdout.count("KEPT") >= 4
    labels = tree_copy / "synthseg_src" / "synthseg_native" / "engine" / "labels.py"
    labels.write_text(labels.read_text() + "\nfrom ..batch import plan  # a deliberate violation\n")
    broken = _lint(tree_copy)
    assert broken.returncode != 0
    assert "synthseg_native.engine is not allowed to import synthseg_native.batch" in broken.stdout


@pytest.mark.skipif(not LINT_IMPORTS.is_file(), reason="import-linter is not installed (make setup)")
def test_tensorflow_outside_the_backend_is_caught(tree_copy: Path):
    memory = tree_copy / "synthseg_src" / "synthseg_native" / "engine" / "memory.py"
    memory.write_text(memory.read_text() + "\nimport tensorflow  # a deliberate violation\n")
    broken = _lint(tree_copy)
    assert broken.returncode != 0
    assert "synthseg_native.engine.memory is not allowed to import tensorflow" in broken.stdout
