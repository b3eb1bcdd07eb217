"""Put first on PYTHONPATH by tests/tools/test_gpucheck.py: the packages the lent GPU machine lacks are made
unimportable, so the test runs what that machine would (and by the tests of other environments: a torch-only or a
bare install).

TensorFlow, Keras and nilearn are not there at all (``TEST_ABSENT=a,b`` names other packages instead).
``GPU_CHECK_TEST_ONLY_FROM=name=folder`` makes ``name`` (the test uses nibabel, which the device lacks too) importable
only from ``folder``: from the carried wheel that ``gpu_check.sh run`` installs there, not from this machine's
environment.
"""

import importlib.abc
import importlib.machinery
import os
import sys

ABSENT = tuple(os.environ.get("TEST_ABSENT", "tensorflow,keras,nilearn").split(","))
ONLY_FROM = dict(item.split("=", 1) for item in os.environ.get("GPU_CHECK_TEST_ONLY_FROM", "").split(",") if item)


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU machine has none)", name=name)
        if name in ONLY_FROM:  # a top-level package: only from its folder (its submodules follow its __path__)
            spec = importlib.machinery.PathFinder.find_spec(name, [ONLY_FROM[name]])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (only from {ONLY_FROM[name]})", name=name)
            return spec
        return None


sys.meta_path.insert(0, _Absent())
