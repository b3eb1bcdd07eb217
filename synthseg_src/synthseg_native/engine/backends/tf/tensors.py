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

The slabs TensorFlow returns are gathered into numpy arrays (skips, pooled levels, posteriors) by
:func:`copy_into`, on as many threads as TensorFlow has: each of those arrays is new memory, and writing new
memory is bound by page faults, not bandwidth. On the 2-core Zen 4 VM of 2026-12-04, a VM whose freed memory
goes back to its host, one thread filled 1 GB of new memory in 0.7-1.9 s (0.08 s once touched), two threads in
0.3-0.4 s; one full-size scan (both passes) gathered 4.9 GB this way while the other core waited: 7.7 s of a
59 s network stage.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


BFLOAT16 = np.dtype(tf.bfloat16.as_numpy_dtype)


def shareable(array: np.ndarray) -> bool:
    """Whether TensorFlow can take this array's memory as it is: contiguous, writable, aligned, not empty, and of
    a type DLPack describes (ints and IEEE floats; not bool) or ``--precision bf16``'s bfloat16, which numpy knows
    only as an extension type and DLPack not at all: it crosses as its 16-bit pattern (:func:`as_tensor`)."""
    return (array.size > 0 and (array.dtype.kind in "iuf" or array.dtype == BFLOAT16) and array.flags.c_contiguous
            and array.flags.writeable and array.ctypes.data % ALIGN == 0)


def as_tensor(value: np.ndarray | tf.Tensor) -> np.ndarray | tf.Tensor:
    """``value`` for a ``tf.function`` call: a tensor sharing a shareable array's memory; anything else
    unchanged (TensorFlow then converts it as usual, copying arrays). The caller must not write to the
    array until the call that receives the tensor has returned.

    A bfloat16 array goes over as uint16 and is bitcast back, which TensorFlow does on the same buffer."""
    if not (isinstance(value, np.ndarray) and shareable(value)):
        return value
    if value.dtype == BFLOAT16:
        return tf.bitcast(tf.experimental.dlpack.from_dlpack(value.view(np.uint16).__dlpack__()), tf.bfloat16)
    return tf.experimental.dlpack.from_dlpack(value.__dlpack__())


PARALLEL_BYTES = 8 << 20  # below this a copy is not worth a thread hand-over
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, executor): a forked child makes its own


def copy_threads() -> int:
    """The threads TensorFlow computes with (its intra-op count; all cores when left at its default)."""
    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1


def copy_into(dst: np.ndarray, src: np.ndarray | tf.Tensor) -> None:
    """``dst[...] = src`` (same shape), split along the axis after the rows over :func:`copy_threads` threads.

    numpy copies without the GIL, so the parts run truly in parallel; small or unsplittable copies, and
    ``--threads 1``, stay on the calling thread. The bytes written are those of the plain assignment."""
    global _pool
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"copy_into: shapes differ, {src.shape} into {dst.shape}")
    threads = copy_threads()
    axis = 2 if dst.ndim > 2 else dst.ndim - 1
    parts = min(threads, dst.shape[axis]) if dst.ndim else 1
    if parts < 2 or dst.nbytes < PARALLEL_BYTES:
        dst[...] = src
        return
    if _pool is None or _pool[0] != os.getpid() or _pool[1] != threads:
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown()
        _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="synthseg-copy"))
    bounds = np.linspace(0, dst.shape[axis], parts + 1).astype(int)
    index = [slice(None)] * dst.ndim
    jobs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        index[axis] = slice(lo, hi)
        jobs.append(_pool[2].submit(np.copyto, dst[tuple(index)], src[tuple(index)]))
    for job in jobs:
        job.result()
