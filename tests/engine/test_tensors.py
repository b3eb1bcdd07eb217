"""engine/backends/tf/tensors.py: numpy arrays handed to TensorFlow without TensorFlow's copy, only when safe."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from synthseg_native.engine.backends.tf.tensors import ALIGN, aligned_empty, as_tensor, shareable


@pytest.mark.parametrize("shape, dtype", [((1, 7, 32, 32, 24), np.float32), ((3, 5), np.int32), ((2, 3), np.uint8)])
def test_aligned_empty_starts_on_the_boundary_tensorflow_checks(shape, dtype):
    for _ in range(5):  # different allocations, different offsets inside their blocks
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % ALIGN == 0


def test_as_tensor_shares_an_aligned_array_and_its_row_slabs():
    a = aligned_empty((1, 6, 32, 32, 2), np.float32)
    a[...] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    whole, rows = as_tensor(a), as_tensor(a[:, 2:4])  # rows: strides of 32*32*2*4 bytes keep the alignment
    assert isinstance(whole, tf.Tensor) and isinstance(rows, tf.Tensor)
    np.testing.assert_array_equal(rows.numpy(), a[:, 2:4])
    a[0, 2, 0, 0, 0] = -1.0  # shared, not copied: what the caller promises not to do during a call
    assert float(whole[0, 2, 0, 0, 0]) == -1.0 and float(rows[0, 0, 0, 0, 0]) == -1.0
    f = tf.function(lambda t: t * 2.0)
    np.testing.assert_array_equal(f(as_tensor(a)).numpy(), a * 2.0)


def test_anything_tensorflow_cannot_share_is_passed_on_unchanged():
    base = aligned_empty((4, 64), np.float32)
    base[...] = 1.0
    unaligned = base.reshape(-1)[1:65]          # 4 bytes past the boundary: TensorFlow would abort on it
    strided = base[:, ::2]
    readonly = np.asarray(tf.ones([4, 4]))      # a view of TensorFlow's own buffer
    empty = aligned_empty((1, 0, 4), np.float32)
    flags = aligned_empty((2, 64), bool)
    bf16_strided = aligned_empty((2, 64), tf.bfloat16.as_numpy_dtype)[:, ::2]
    for array in (unaligned, strided, readonly, empty, flags, bf16_strided):
        assert not shareable(array)
        assert as_tensor(array) is array
    t = tf.ones([2])
    assert as_tensor(t) is t



def test_bfloat16_arrays_are_shared_as_their_bit_pattern():
    bf16 = tf.bfloat16.as_numpy_dtype  # --precision bf16's skips and windows
    a = aligned_empty((1, 4, 32, 32, 3), bf16)
    a[...] = np.linspace(-3, 3, a.size, dtype=np.float32).reshape(a.shape).astype(bf16)
    assert shareable(a) and shareable(a[:, 1:3])
    t = as_tensor(a[:, 1:3])
    assert isinstance(t, tf.Tensor) and t.dtype == tf.bfloat16 and t.shape == (1, 2, 32, 32, 3)
    assert t.numpy().tobytes() == a[:, 1:3].tobytes()
    a[0, 1, 0, 0, 0] = bf16(7.0)  # the same memory, not a copy
    assert float(t[0, 0, 0, 0, 0]) == 7.0
    f = tf.function(lambda x: x * tf.constant(2, tf.bfloat16))
    assert f(as_tensor(a)).numpy().tobytes() == (a * bf16(2)).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.int32, tf.bfloat16.as_numpy_dtype])
def test_copy_into_writes_the_bytes_of_the_plain_assignment(dtype, monkeypatch):
    from synthseg_native.engine.backends.tf import tensors

    monkeypatch.setattr(tensors, "PARALLEL_BYTES", 0)  # split even these small arrays
    monkeypatch.setattr(tensors, "copy_threads", lambda: 3)  # 7 columns in 3 uneven parts
    src = (np.arange(4 * 7 * 5 * 3) % 251).astype(dtype).reshape(1, 4, 7, 5, 3)
    whole = aligned_empty(src.shape, dtype)
    tensors.copy_into(whole, tf.constant(src) if dtype is np.float32 else src)
    assert whole.tobytes() == src.tobytes()
    big = np.zeros((1, 9, 7, 5, 3), dtype)
    tensors.copy_into(big[:, 2:6], src)  # a row window of a bigger array, as the slabs are gathered
    assert big[:, 2:6].tobytes() == src.tobytes()
    assert not big[:, :2].any() and not big[:, 6:].any()


def test_copy_into_refuses_a_shape_mismatch_and_keeps_small_copies_on_the_calling_thread(monkeypatch):
    from synthseg_native.engine.backends.tf import tensors

    with pytest.raises(ValueError, match="shapes differ"):
        tensors.copy_into(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))

    def no_threads(*args, **kwargs):
        raise AssertionError("a thread pool for a copy under PARALLEL_BYTES")

    monkeypatch.setattr(tensors, "ThreadPoolExecutor", no_threads)
    monkeypatch.setattr(tensors, "copy_threads", lambda: 4)
    small = np.zeros((1, 4, 4, 4, 2), np.float32)
    tensors.copy_into(small, np.ones_like(small))
    assert small.all()
