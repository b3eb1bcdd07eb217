"""Put first on PYTHONPATH by tests/tools/test_gpucheck.py: the packages the lent GPU machine lacks are made
unimportable, so the test runs what that machine would (TensorFlow, Keras and nilearn are not there)."""

import importlib.abc
import sys

ABSENT = ("tensorflow", "keras", "nilearn")


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU machine has none)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
