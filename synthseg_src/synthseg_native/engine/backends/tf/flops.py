"""Exact floating-point operation count of a network at a given input shape.

A throughput figure (GFLOP/s) is only comparable with the machine's conv3d roofline if both count
the same thing, so this counts what dominates and what the roofline measures: every Conv3D of the
traced inference graph, 2 FLOPs per multiply-add (2·k³·C_in·C_out per output voxel) plus one per
output value for its bias. BatchNorm, activations, pooling, upsampling and softmax are left out
(they are memory-bound and well under 1 % of the arithmetic of a SynthSeg U-Net).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf


def per_voxel_flop(c_in: int, c_out: int, kernel: int, bias: bool = True) -> int:
    """FLOPs of one output voxel of a ``kernel``³ convolution: 2 per multiply-add, 1 per bias value."""
    return c_out * (2 * kernel ** 3 * c_in + (1 if bias else 0))


@dataclass(frozen=True)
class ConvShape:
    """One convolution of a traced graph: its output grid, channels and kernel edge, and its FLOPs."""

    grid: tuple[int, int, int]
    c_in: int
    c_out: int
    kernel: int
    flop: int


def conv_shapes(model: tf.keras.Model, shape: Sequence[int]) -> list[ConvShape]:
    """Every Conv3D of one inference of ``model`` on a ``(1, *shape)`` input, in graph order, with its FLOPs
    (what a per-layer profile compares with the bare convolution of the same shape)."""
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, *shape], tf.float32)).graph
    found = []
    for op in _all_ops(graph):
        if op.type not in ("Conv3D", "Conv2D"):
            continue
        kernel = op.inputs[1].shape.as_list()
        out = op.outputs[0].shape.as_list()
        if None in kernel or None in out:
            raise ValueError(f"{op.name}: shapes not fully known ({kernel}, {out})")
        voxels = int(np.prod(out[:-1]))
        flop = voxels * per_voxel_flop(kernel[-2], kernel[-1], kernel[0], _has_bias(op))
        grid = tuple(out[1:-1]) + (1,) * (3 - len(out[1:-1]))
        found.append(ConvShape(grid, kernel[-2], kernel[-1], kernel[0], flop))  # type: ignore[arg-type]
    return found


def conv_flops(model: tf.keras.Model, shape: Sequence[int]) -> int:
    """FLOPs of one inference of ``model`` on a ``(1, *shape)`` input (channels last included)."""
    return sum(c.flop for c in conv_shapes(model, shape))


def _all_ops(graph: tf.Graph):
    yield from graph.get_operations()
    for fn in getattr(graph, "_functions", {}).values():  # nested functions (Lambda layers, while bodies)
        yield from _all_ops(fn.graph) if hasattr(fn, "graph") else ()


def _has_bias(op: tf.Operation) -> bool:
    return any(c.type == "BiasAdd" for c in op.outputs[0].consumers())
