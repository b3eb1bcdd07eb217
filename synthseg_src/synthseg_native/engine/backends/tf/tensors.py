"""Handing numpy arrays to TensorFlow without the copy TensorFlow makes of each one.

TensorFlow copies every numpy array passed to a ``tf.function`` (``convert_to_eager_tensor`` calls
``value.copy()``, so that later writes to the array cannot reach the tensor). That copy is single-threaded;
for the staged U-Net's slabs, skips and posteriors it added up to ~6 s of a 69 s network stage on a 2-core
Zen 4 (cProfile of one cold run, full MNI152: 311 copies), while the other core waited. The engine's own
arrays are never written while TensorFlow reads them (each call returns before the array is touched
again), so they can be shared instead: DLPack hands TensorFlow the array's memory as it is. TensorFlow's
CPU tensors must start on a 64-byte boundary (it aborts the process otherwise), so the arrays that cross
over are allocated aligned, and anything else (unaligned, strided, read-only) still goes the copying way.
Only where the bytes live changes, never a value: the outputs are the same bits (equivalence.md).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

ALIGN = 64  # bytes: Eigen's EIGEN_MAX_ALIGN_BYTES, which TensorFlow checks for every CPU tensor


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type | str) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on a 64-byte boundary, so that it and its row slabs (whose
    strides are multiples of 64 bytes on the padded grids) can be shared with TensorFlow."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def shareable(array: np.ndarray) -> bool:
    """Whether TensorFlow can take this array's memory as it is: contiguous, writable, aligned, not empty, and of
    a type DLPack describes (ints and IEEE floats; not bool, nor the bfloat16 arrays of ``--precision bf16``,
    which numpy knows only as an extension type: those are still copied)."""
    return (array.size > 0 and array.dtype.kind in "iuf" and array.flags.c_contiguous and array.flags.writeable
            and array.ctypes.data % ALIGN == 0)


def as_tensor(value: np.ndarray | tf.Tensor) -> np.ndarray | tf.Tensor:
    """``value`` for a ``tf.function`` call: a tensor sharing a shareable array's memory; anything else
    unchanged (TensorFlow then converts it as usual, copying arrays). The caller must not write to the
    array until the call that receives the tensor has returned."""
    if isinstance(value, np.ndarray) and shareable(value):
        return tf.experimental.dlpack.from_dlpack(value.__dlpack__())
    return value
