"""Native SynthSeg toolkit: SynthSeg brain MRI segmentation (Billot et al.), identical to upstream on the CPU.

The public API (``docs/api.md``)::

    from synthseg_native import segment, Segmenter

    segment("t1.nii.gz", "t1_synthseg.nii.gz", vol="volumes.csv")     # as the command line
    seg = Segmenter(parc=True)                                        # networks loaded once
    result = seg.segment_image(nibabel.load("t1.nii.gz"))             # in memory

The names are imported on first use, so ``import synthseg_native`` stays cheap and starts no TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import log as _log  # noqa: F401  (installs the [TAG] line handler of the package's logger)
from .version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from .api import ImageResult, Result, ScanReport, Segmenter, segment
    from .errors import InputError, MemoryShortage, OutputError, SynthSegError, UpstreamError, UsageError, WeightsError

_LAZY = {
    "segment": "api", "Segmenter": "api", "Result": "api", "ImageResult": "api", "ScanReport": "api",
    "SynthSegError": "errors", "UsageError": "errors", "InputError": "errors", "OutputError": "errors",
    "WeightsError": "errors", "MemoryShortage": "errors", "UpstreamError": "errors",
}
__all__ = ["ImageResult", "InputError", "MemoryShortage", "OutputError", "Result", "ScanReport", "Segmenter",
           "SynthSegError", "UpstreamError", "UsageError", "WeightsError", "__version__", "segment"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
