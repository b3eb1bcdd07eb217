"""Exact floating-point operation count of a network at a given input shape.

A throughput figure (GFLOP/s) is only comparable with the machine's conv3d roofline if both count
the same thing, so this counts what dominates and what the roofline measures: every Conv3D of the
traced inference graph, 2 FLOPs per multiply-add (2·k³·C_in·C_out per output voxel) plus one per
output value for its bias. BatchNorm, activations, pooling, upsampling and softmax are left out
(they are memory-bound and well under 1 % of the arithmetic of a SynthSeg U-Net).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def conv_flops(model: tf.keras.Model, shape: Sequence[int]) -> int:
    """FLOPs of one inference of ``model`` on a ``(1, *shape)`` input (channels last included)."""
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, *shape], tf.float32)).graph
    total = 0
    for op in _all_ops(graph):
        if op.type not in ("Conv3D", "Conv2D"):
            continue
        kernel = op.inputs[1].shape.as_list()
        out = op.outputs[0].shape.as_list()
        if None in kernel or None in out:
            raise ValueError(f"{op.name}: shapes not fully known ({kernel}, {out})")
        per_output = 2 * int(np.prod(kernel[:-1]))  # k³·C_in multiply-adds per output value
        total += int(np.prod(out)) * per_output
        if _has_bias(op):
            total += int(np.prod(out))
    return total


def _all_ops(graph: tf.Graph):
    yield from graph.get_operations()
    for fn in getattr(graph, "_functions", {}).values():  # nested functions (Lambda layers, while bodies)
        yield from _all_ops(fn.graph) if hasattr(fn, "graph") else ()


def _has_bias(op: tf.Operation) -> bool:
    return any(c.type == "BiasAdd" for c in op.outputs[0].consumers())
