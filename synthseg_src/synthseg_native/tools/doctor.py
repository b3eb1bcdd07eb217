"""``make doctor`` / ``synthseg-native-doctor``: versions, devices, and where Conv3D and BatchNorm really run."""

from __future__ import annotations

import logging
import sys

from ..engine.backends.tf.devices import prepare_tensorflow, report

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too


def main(argv: list[str] | None = None) -> int:
    """Print the TensorFlow backend's device report as [INFO] lines."""
    del argv  # no options; the signature matches the other tools' entry points
    prepare_tensorflow()  # before TensorFlow's import: C++ start-up noise off, same kernels as the engine
    for line in report().splitlines():
        logger.info(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
