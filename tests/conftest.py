"""Test session set-up: quiet TensorFlow, the shared engine fixtures (weights, real MRI inputs), the slow marker.

A test that runs the networks (it asks for the ``weights`` fixture) or builds environments is ``slow``:
``make test-fast`` (``pytest -m "not slow"``) leaves those out and runs in a few minutes; ``make test`` runs all.
"""

import pytest

from synthseg_native.engine.backends.tf.devices import prepare_tensorflow

prepare_tensorflow()  # same TensorFlow kernels as the command line (oneDNN on x86-64 Linux)

pytest_plugins = ["engine_fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "weights" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
