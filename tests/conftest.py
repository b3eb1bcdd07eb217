"""Test session set-up: quiet TensorFlow, and the shared engine fixtures (weights, real MRI inputs)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

pytest_plugins = ["engine_fixtures"]
