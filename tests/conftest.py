"""Test session set-up: quiet TensorFlow, and the shared engine fixtures (weights, real MRI inputs)."""

from synthseg_native.devices import prepare_tensorflow

prepare_tensorflow()  # same TensorFlow kernels as the command line (oneDNN on x86-64 Linux)

pytest_plugins = ["engine_fixtures"]
