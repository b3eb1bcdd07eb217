"""Inputs of the parcellation and QC heads, built from the segmentation network's hard decision.

Both heads consume an argmax of the (unprocessed) segmentation posteriors, exactly as upstream's
single inference graph does; here the same steps run between separate network calls.
"""

from __future__ import annotations

import numpy as np

from . import architecture as arch
from . import labels as L


def parc_input(image: np.ndarray, cortex: np.ndarray) -> np.ndarray:
    """Image channel followed by a one-hot (not cortex, cortex) map: (1, X, Y, Z, 3) float32."""
    one_hot = np.eye(2, dtype=np.float32)[cortex.astype(np.int64)]
    return np.concatenate([image, one_hot], axis=-1)


def cortex_lut(label_set: L.LabelSet) -> np.ndarray:
    """Channel index → 1 for cerebral cortex (3, 42), else 0."""
    return np.isin(label_set.labels, [3, 42]).astype(np.int32)


def qc_lut(label_set: L.LabelSet) -> np.ndarray:
    return label_set.qc_groups.astype(np.int32)


def make_shape(channels: np.ndarray, target: int = arch.QC_SHAPE) -> np.ndarray:
    """Crop/pad a channel-index map to ``target``³ around its foreground, like upstream's MakeShape.

    Upstream's foreground test compares channel *indices* with 0 and 24 (it meant label 24, CSF,
    but index 24 is the right cerebellum cortex); reproduced as is so QC inputs are identical.
    """
    shape = np.array(channels.shape)
    goal = np.array([target] * 3)
    idx = np.argwhere((channels != 0) & (channels != 24))
    if len(idx) == 0:
        lo, hi = np.zeros(3, dtype=np.int64), np.minimum(shape, goal)
    else:
        lo, hi = np.maximum(idx.min(0), 0), np.minimum(idx.max(0) + 1, shape)
    extent = hi - lo
    lo = lo - np.ceil((goal - extent) / 2).astype(np.int64)
    hi = hi + np.floor((goal - extent) / 2).astype(np.int64)
    a, b = np.maximum(lo, 0), np.minimum(hi, shape)
    size = np.minimum(b - a, shape)
    out = channels[a[0]:a[0] + size[0], a[1]:a[1] + size[1], a[2]:a[2] + size[2]]
    before, after = np.abs(np.minimum(lo, 0)), np.maximum(hi - shape, 0)
    if np.any(before > 0) or np.any(after > 0):
        out = np.pad(out, np.stack([before, after], axis=1))
    return out


def qc_input(seg_channels: np.ndarray, label_set: L.LabelSet) -> np.ndarray:
    """(1, 224, 224, 224, n_groups) one-hot of QC structure groups (``architecture.QC_SHAPE``, read at call time)."""
    cropped = make_shape(seg_channels, arch.QC_SHAPE)
    groups = qc_lut(label_set)[cropped]
    n_groups = len(np.unique(label_set.qc_groups))
    return np.eye(n_groups, dtype=np.float32)[groups][np.newaxis]
