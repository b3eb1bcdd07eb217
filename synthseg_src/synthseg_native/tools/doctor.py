"""``make doctor`` / ``synthseg-native-doctor``: versions, devices, and where Conv3D and BatchNorm really run.

Each installed backend reports: TensorFlow (where its ops really run, fused BatchNorm on Metal) and PyTorch
(CUDA / MPS / CPU, and which reduced precisions each supports). An environment built with ``BACKEND=torch`` has
no TensorFlow, which the report says instead of failing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too


def main(argv: list[str] | None = None) -> int:
    """Print each installed backend's device report as [INFO] lines; exit 1 when neither is installed."""
    del argv  # no options; the signature matches the other tools' entry points
    found = 0
    if importlib.util.find_spec("tensorflow") is not None:
        from ..engine.backends.tf.devices import prepare_tensorflow, report

        prepare_tensorflow()  # before TensorFlow's import: C++ start-up noise off, same kernels as the engine
        for line in report().splitlines():
            logger.info(line)
        found += 1
    else:
        logger.info("TensorFlow: not installed (the tf backend is unavailable; --backend torch runs without it)")
    if importlib.util.find_spec("torch") is not None:
        from ..engine.backends.torch.devices import report as torch_report

        for line in torch_report().splitlines():
            logger.info(line)
        found += 1
    else:
        logger.info("PyTorch: not installed (--backend torch needs it: make setup BACKEND=torch, or "
                    "pip install 'synthseg-native[torch]')")
    if not found:
        logger.error("neither TensorFlow nor PyTorch is installed: run make setup")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
